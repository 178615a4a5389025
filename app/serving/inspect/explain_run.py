"""Running an explanation's forward passes: through the model's batcher for the service, or
directly for an evaluation (training/faithfulness.py), with the same method code either way.

Through the batcher, a pass of images is cut into batches of at most the model's batch size and
those go in together, so that every worker of the model can take one, and they queue with
everyone else's requests (a client's /classify is not starved behind an explanation's hundreds
of passes); a pass through a layer's tail runs as one job on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from app.serving.disconnect import Gone, unless_gone
from app.serving.inspect.explain import Explainer, Method, Pass
from app.serving.loader import Model


async def drive(method: Method, model: Model, explainer: Explainer, batch_size: int, gone: Gone | None) -> np.ndarray:
    """The map ``method`` returns once every pass it asked for has run through ``model``'s batcher."""
    try:
        step = next(method)
        while True:
            rows = await unless_gone(_through_batcher(step, model, explainer, batch_size), gone)
            step = method.send(np.concatenate(rows) if isinstance(rows, list) else rows)
    except StopIteration as done:
        result: np.ndarray = done.value
        return result


def _through_batcher(step: Pass, model: Model, explainer: Explainer, batch_size: int) -> asyncio.Future[Any]:
    """One future for the pass (cancelling it drops what has not run yet)."""
    batcher, timeout = model.batcher, model.timeout
    if step.tail is not None:
        tensor, values = step.tail, step.batch
        assert isinstance(values, dict)
        return batcher.call(lambda: explainer.run_tail(tensor, values), timeout)
    assert isinstance(step.batch, np.ndarray)
    images = step.batch
    parts: list[asyncio.Future[np.ndarray]] = []
    try:
        for start in range(0, len(images), batch_size):
            parts.append(batcher.submit(images[start : start + batch_size], timeout))
    except Exception:  # the queue is full: what went in is dropped unrun
        for part in parts:
            part.cancel()
        raise
    return asyncio.gather(*parts)


def run(method: Method, forward: Callable[[np.ndarray], np.ndarray], explainer: Explainer) -> np.ndarray:
    """The map ``method`` returns with its passes run here, images through ``forward``."""
    try:
        step = next(method)
        while True:
            if step.tail is not None:
                assert isinstance(step.batch, dict)
                rows = explainer.run_tail(step.tail, step.batch)
            else:
                assert isinstance(step.batch, np.ndarray)
                rows = forward(step.batch)
            step = method.send(rows)
    except StopIteration as done:
        result: np.ndarray = done.value
        return result
