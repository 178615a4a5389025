"use strict";
// Why this class? The /explain methods beside the feature maps, what the network was given,
// example images to try, and the first convolution worked by hand (the lecture's view).
// Independent of app.js: it follows the same photo and model through the page's own controls.
(() => {
  const byId = (id) => document.getElementById(id);
  const ex = { photo: null, model: null, listing: null, kernels: null, values: null, outputs: {}, pos: [0, 0], urls: {}, turn: 0 };

  function auth() {
    const key = byId("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function fetchOk(path, options = {}) {
    const response = await fetch(path, { ...options, headers: { ...auth(), ...(options.headers || {}) } });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(`${response.status}: ${typeof body.detail === "string" ? body.detail : response.statusText}`);
    }
    return response;
  }

  function photoForm() {
    const form = new FormData();
    form.append("file", ex.photo, ex.photo.name || "photo");
    return form;
  }

  function show(img, key, blob) {
    if (ex.urls[key]) URL.revokeObjectURL(ex.urls[key]);
    ex.urls[key] = URL.createObjectURL(blob);
    img.src = ex.urls[key];
  }

  function caption(text, isError = false) {
    byId("explain-caption").textContent = text;
    byId("explain-caption").classList.toggle("error", isError);
  }

  // -- the model: its layers, the methods each takes, its first convolution -------------------

  async function chooseModel() {
    const name = byId("model").value;
    if (!name || name === ex.model) return;
    ex.model = name;
    ex.listing = null;
    ex.values = null;
    ex.outputs = {};
    const listing = await (await fetchOk(`/models/${name}/layers`)).json();
    if (name !== ex.model) return;
    ex.listing = listing;
    const explained = listing.layers.filter((layer) => layer.methods.length);
    byId("explain-layer").replaceChildren(...explained.map((layer) => new Option(layer.name, layer.name, false, layer.name === listing.explain_layer)));
    offerMethods();
    showExamples(listing.input_shape);
    await loadKernels(name);
    if (ex.photo) await refresh();
  }

  // A method that does not fit the chosen layer (too many passes) stays on offer when the
  // service has a layer of its own for it (explain_layers), and choosing it moves there.
  function offerMethods() {
    const layer = ex.listing.layers.find((l) => l.name === byId("explain-layer").value);
    const defaults = ex.listing.explain_layers || {};
    for (const option of byId("explain-method").options) {
      const cost = option.value === "occlusion" ? null : layer && layer.passes[option.value];
      const applies = option.value === "occlusion" || (layer && layer.methods.includes(option.value));
      option.disabled = (!applies || cost > ex.listing.max_passes) && !defaults[option.value];
      option.textContent = option.textContent.replace(/ \(\d+ passes\)$/, "") + (cost > 1 ? ` (${cost} passes)` : "");
    }
    byId("explain-layer").disabled = byId("explain-method").value === "occlusion";
  }

  function followDefault() {
    const method = byId("explain-method").value;
    const layer = ex.listing.layers.find((l) => l.name === byId("explain-layer").value);
    const fits = layer && layer.methods.includes(method) && layer.passes[method] <= ex.listing.max_passes;
    const own = (ex.listing.explain_layers || {})[method];
    if (!fits && own) byId("explain-layer").value = own;
  }

  async function loadKernels(name) {
    ex.kernels = null;
    try {
      ex.kernels = await (await fetchOk(`/models/${name}/kernels?format=json`)).json();
      show(byId("lecture-kernels"), "kernels", await (await fetchOk(`/models/${name}/kernels`)).blob());
    } catch (error) {
      byId("lecture-sum").textContent = `No first convolution to show: ${error.message}`;
      return;
    }
    const count = ex.kernels.shape[0];
    byId("lecture-channel").replaceChildren(...Array.from({ length: count }, (_, k) => new Option(`${k + 1} of ${count}`, String(k))));
  }

  // -- examples ---------------------------------------------------------------------------------

  async function showExamples(inputShape) {
    const small = inputShape[0] === 1 && inputShape[1] <= 64;
    const entries = await (await fetch("/static/examples/examples.json")).json();
    const buttons = entries.filter((e) => (e.kind === "fashion") === small).map((entry) => {
      const button = document.createElement("button");
      button.type = "button";
      button.title = entry.label;
      button.setAttribute("aria-label", `try the example: ${entry.label}`);
      const img = document.createElement("img");
      img.src = `/static/examples/${entry.file}`;
      img.alt = entry.label;
      button.append(img);
      button.addEventListener("click", () => useExample(entry).catch((error) => caption(error.message, true)));
      return button;
    });
    byId("explain-examples").replaceChildren(...buttons);
    byId("explain").hidden = false;
  }

  // The example goes in through the page's own file input, so that every part of the page
  // (classification, feature maps, this section) takes it as if it had been chosen there.
  async function useExample(entry) {
    const blob = await (await fetch(`/static/examples/${entry.file}`)).blob();
    const file = new File([blob], entry.file, { type: blob.type });
    const transfer = new DataTransfer();
    transfer.items.add(file);
    byId("file").files = transfer.files;
    byId("file").dispatchEvent(new Event("change"));
  }

  // -- the photo: what the network was given, and the map -------------------------------------

  function usePhoto(file) {
    if (!file) return;
    ex.photo = file;
    ex.values = null;
    ex.outputs = {};
    refresh();
  }

  async function refresh() {
    if (!ex.photo || !ex.listing) return;
    byId("explain").hidden = false;
    await Promise.all([showGiven(), showMap(), loadLecture()]).catch((error) => caption(error.message, true));
  }

  async function showGiven() {
    const response = await fetchOk(`/preprocess?model=${ex.model}`, { method: "POST", body: photoForm() });
    show(byId("explain-given"), "given", await response.blob());
    const [c, h, w] = ex.listing.input_shape;
    byId("explain-given-caption").textContent = `What the network was given: ${w}x${h}, ${c === 1 ? "grey" : "colour"}`;
  }

  async function showMap() {
    const turn = ++ex.turn;
    const method = byId("explain-method").value;
    const query = new URLSearchParams({ model: ex.model, method });
    if (method !== "occlusion") query.set("layer", byId("explain-layer").value);
    caption(`Computing ${byId("explain-method").selectedOptions[0].textContent}…`);
    try {
      const response = await fetchOk(`/explain?${query}`, { method: "POST", body: photoForm() });
      if (turn !== ex.turn) return;
      show(byId("explain-map"), "map", await response.blob());
      const h = response.headers;
      const where = h.get("x-layer") ? ` at ${h.get("x-layer")}` : " (a grey square slid over the input)";
      caption(`${method}${where}: evidence for “${h.get("x-class-label")}” (${(Number(h.get("x-class-score")) * 100).toFixed(1)}%)`);
    } catch (error) {
      if (turn === ex.turn) caption(error.message, true);
    }
  }

  // -- the lecture's view: kernel x input patch + bias = one output value ----------------------

  async function loadLecture() {
    if (!ex.kernels) return;
    const response = await fetchOk(`/explain/input?model=${ex.model}`, { method: "POST", body: photoForm() });
    ex.values = (await response.json()).values;
    await drawLecture();
  }

  async function outputValue(channel) {
    if (!(channel in ex.outputs)) {
      const query = new URLSearchParams({ model: ex.model, layer: ex.kernels.layer.name, format: "json", values: "true", channels: String(channel) });
      const response = await fetchOk(`/featuremaps?${query}`, { method: "POST", body: photoForm() });
      ex.outputs[channel] = (await response.json()).values[0];
    }
    return ex.outputs[channel];
  }

  function table(element, rows, padded) {
    element.replaceChildren(...rows.map((row, i) => {
      const tr = document.createElement("tr");
      tr.append(...row.map((value, j) => {
        const td = document.createElement("td");
        td.textContent = value.toFixed(2);
        if (padded && padded[i][j]) td.className = "pad";
        return td;
      }));
      return tr;
    }));
  }

  async function drawLecture() {
    if (!ex.values || !ex.kernels) return;
    const layer = ex.kernels.layer;
    const k = Number(byId("lecture-channel").value || 0);
    const weights = ex.kernels.weights[k];
    const [F, FW] = layer.kernel;
    const [S, SW] = layer.stride;
    const [P, PW] = layer.padding;
    const [D, DW] = layer.dilation;
    const [outH, outW] = layer.output_shape.slice(1);
    const [r, c] = [Math.min(ex.pos[0], outH - 1), Math.min(ex.pos[1], outW - 1)];
    const groups = layer.groups || 1;
    const first = Math.floor(k / (ex.kernels.shape[0] / groups)) * weights.length;
    let total = ex.kernels.bias ? ex.kernels.bias[k] : 0;
    const patches = weights.map((kernel, ci) => kernel.map((row, i) => row.map((_, j) => {
      const y = r * S - P + i * D;
      const x = c * SW - PW + j * DW;
      const plane = ex.values[first + ci];
      const inside = y >= 0 && x >= 0 && y < plane.length && x < plane[0].length;
      const value = inside ? plane[y][x] : 0;
      total += kernel[i][j] * value;
      return { value, inside };
    })));
    table(byId("lecture-kernel"), weights[0], null);
    table(byId("lecture-patch"), patches[0].map((row) => row.map((p) => p.value)), patches[0].map((row) => row.map((p) => !p.inside)));
    const served = (await outputValue(k))[r][c];
    const channels = weights.length > 1 ? ` (input channel 1 shown; the sum runs over all ${weights.length})` : "";
    byId("lecture-sum").textContent =
      `Output (${r}, ${c}) of kernel ${k + 1}: Σ kernel × patch + bias = ${total.toFixed(4)} by hand; the network computed ${served.toFixed(4)}${channels}.`;
    byId("lecture-formula").textContent =
      `${layer.name}: kernel F = ${F}x${FW}, stride S = ${S}, padding P = ${P}` +
      ` (grey cells are padding) · ${layer.formula || ""} · output ${outH}x${outW}`;
  }

  function moveKernel(event) {
    if (!ex.kernels || !ex.listing) return;
    const img = byId("explain-given");
    const box = img.getBoundingClientRect();
    const [, h, w] = ex.listing.input_shape;
    const y = ((event.clientY - box.top) / box.height) * h;
    const x = ((event.clientX - box.left) / box.width) * w;
    const layer = ex.kernels.layer;
    const [outH, outW] = layer.output_shape.slice(1);
    const clamp = (v, top) => Math.max(0, Math.min(top - 1, Math.round(v)));
    ex.pos = [
      clamp((y + layer.padding[0] - (layer.kernel[0] - 1) / 2) / layer.stride[0], outH),
      clamp((x + layer.padding[1] - (layer.kernel[1] - 1) / 2) / layer.stride[1], outW),
    ];
    drawLecture().catch((error) => caption(error.message, true));
  }

  function wire() {
    byId("file").addEventListener("change", (event) => usePhoto(event.target.files[0]));
    byId("drop").addEventListener("drop", (event) => usePhoto(event.dataTransfer.files[0]));
    byId("model").addEventListener("change", () => chooseModel().catch((error) => caption(error.message, true)));
    byId("explain-method").addEventListener("change", () => {
      followDefault();
      offerMethods();
      if (ex.photo) showMap();
    });
    byId("explain-layer").addEventListener("change", () => {
      offerMethods();
      if (ex.photo) showMap();
    });
    byId("lecture-channel").addEventListener("change", () => drawLecture().catch((error) => caption(error.message, true)));
    byId("explain-given").addEventListener("click", moveKernel);
    // The model list arrives after app.js asks for it; wait until its select has a value.
    const ready = setInterval(() => {
      if (!byId("model").value) return;
      clearInterval(ready);
      chooseModel().catch((error) => caption(error.message, true));
    }, 100);
  }

  wire();
})();
