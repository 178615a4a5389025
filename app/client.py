"""A small Python client for a running cnnserve, typed with the service's own response models.

    from app.client import Client
    with Client("http://127.0.0.1:8000") as client:
        print(client.classify("photo.jpg").predictions[0].label)

It sends the raw image bytes (no multipart overhead), honours 429's Retry-After a few times before
giving up, and raises ``ServiceError`` with the service's own explanation for any other error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.serving.schemas import ClassifyResponse, ModelList

MEDIA_TYPES = {
    b"\xff\xd8\xff": "image/jpeg",
    b"\x89PNG": "image/png",
    b"GIF8": "image/gif",
    b"BM": "image/bmp",
    b"II*\x00": "image/tiff",
    b"MM\x00*": "image/tiff",
}


class ClientSettings(BaseSettings):
    """Where the client looks for the service, from CNNSERVE_URL and CNNSERVE_API_KEY."""

    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", extra="ignore")

    url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None


class ServiceError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def media_type(data: bytes) -> str:
    """The image's type from its first bytes (the service decodes by content, not by this)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media for magic, media in MEDIA_TYPES.items() if data.startswith(magic)), "image/jpeg")


class Client:
    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, retries: int = 3
    ) -> None:
        settings = ClientSettings()
        key = api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url or settings.url, headers=headers, timeout=timeout)
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self.http.request(method, path, **kwargs)
            if response.status_code != 429 or attempt == self.retries:
                break
            time.sleep(float(response.headers.get("Retry-After", "1")))
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, detail)
        return response

    def post_image(self, path: str, image: bytes | str | Path, params: dict[str, Any]) -> httpx.Response:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        query = {key: value for key, value in params.items() if value is not None}
        return self.request("POST", path, params=query, content=data, headers={"content-type": media_type(data)})

    def classify(self, image: bytes | str | Path, model: str | None = None, top_k: int = 5) -> ClassifyResponse:
        response = self.post_image("/classify", image, {"model": model, "top_k": top_k})
        return ClassifyResponse.model_validate_json(response.content)

    def featuremaps(
        self, image: bytes | str | Path, model: str | None = None, layer: str | None = None, channels: str | None = None
    ) -> bytes:
        """The layer's channels tiled in one PNG."""
        params = {"model": model, "layer": layer, "channels": channels}
        return self.post_image("/featuremaps", image, params).content

    def cam(self, image: bytes | str | Path, model: str | None = None, class_index: int | None = None) -> bytes:
        """The class activation map over the photo, as a PNG."""
        return self.post_image("/cam", image, {"model": model, "class_index": class_index}).content

    def models(self) -> ModelList:
        return ModelList.model_validate_json(self.request("GET", "/models").content)

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False
