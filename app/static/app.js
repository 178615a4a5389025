"use strict";
// The cnnserve page: one photo, one model, the top 5 as bars, then the layers one by one.
// Plain DOM and fetch, no framework and no CDN, so it works offline and loads fast on a phone.

const $ = (id) => document.getElementById(id);
const MAX_CHANNELS_SHOWN = 16;
const REFRESH_MS = 5000; // how soon a model loaded or unloaded elsewhere shows here
const state = { photo: null, models: {}, layers: [], layersReady: Promise.resolve(), urls: {} };

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// A backend hands its page a short-lived token (cnnserve token) as /#token=...: a fragment never
// reaches a server or its logs, and it is taken off the address at once.
function takeTokenFromFragment() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!token) return;
  $("api-key").value = token;
  history.replaceState(null, "", location.pathname + location.search);
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function photoForm() {
  const form = new FormData();
  form.append("file", state.photo, state.photo.name || "photo");
  return form;
}

function showImage(img, key, blob) {
  if (state.urls[key]) URL.revokeObjectURL(state.urls[key]);
  state.urls[key] = URL.createObjectURL(blob);
  img.src = state.urls[key];
}

// The listing in the model list, its ready models in state.models; returns those.
function showModels(listing) {
  const ready = listing.models.filter((m) => m.status === "ready");
  $("model-list").replaceChildren(...listing.models.map(modelItem));
  state.models = Object.fromEntries(ready.map((m) => [m.name, m]));
  return ready;
}

const modelOptions = (ready) => ready.map((m) => new Option(m.name, m.name, m.default, m.default));

async function loadModels() {
  const ready = showModels(await (await call("/models")).json());
  $("model").replaceChildren(...modelOptions(ready));
  await chooseModel();
  say("Choose a photo to begin.");
}

// A model imported or loaded while the page is open (cnnserve import, the repository API) appears
// within REFRESH_MS without a reload, and an unloaded one goes; the chosen model stays chosen while
// it serves. Only while the page is seen: a tab in the background asks nothing.
async function refreshModels() {
  if (document.visibilityState !== "visible") return;
  const ready = showModels(await (await call("/models")).json());
  const select = $("model");
  if (ready.map((m) => m.name).join("\n") === [...select.options].map((o) => o.value).join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...modelOptions(ready));
  if (state.models[chosen]) select.value = chosen;
  else if (ready.length) await chooseModel();
}

// One line per model: each version and whether it serves; a refused one (or a refused new copy of
// a version that goes on serving) says why, so that a broken change is seen here, not only in the log.
function versionText(v) {
  const name = v.version ? `version ${v.version}` : "new version";
  if (v.status === "ready") return v.reason ? `${name} ready (a new copy was refused: ${v.reason})` : `${name} ready`;
  return `${name} refused: ${v.reason}`;
}

function modelItem(model) {
  const item = document.createElement("li");
  const versions = model.versions.length ? model.versions.map(versionText).join("; ") : `refused: ${model.reason}`;
  item.textContent = `${model.name}: ${versions}`;
  item.classList.toggle("error", model.status !== "ready" || model.versions.some((v) => v.reason));
  return item;
}

function chooseModel() {
  const model = state.models[$("model").value];
  const accuracy = model.accuracy ? ` · top-1 ${(model.accuracy.top1 * 100).toFixed(1)}% on ${model.accuracy.dataset}` : "";
  $("model-info").textContent = `${model.labels} classes · ${model.input.width}x${model.input.height} ${model.input.color} · ${model.provider}${accuracy}`;
  // A photo chosen while this model's layers are still being listed waits for them (run awaits this).
  // A listing that arrives after another model was chosen is dropped: it would replace that model's layers.
  state.layersReady = call(`/models/${model.name}/layers`).then((r) => r.json()).then((listing) => {
    if ($("model").value !== model.name) return;
    state.layers = listing.layers;
    $("layer").replaceChildren(...state.layers.map((layer, i) => new Option(`${i + 1}. ${layer.name} (${layer.stage})`, String(i))));
  });
  return state.layersReady;
}

function drawBars(predictions) {
  $("bars").replaceChildren(...predictions.map((p) => {
    const item = document.createElement("li");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(p.score * 100).toFixed(1)}%`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(p.score * 100).toFixed(1)}%`;
    item.append(fill, score, document.createTextNode(p.label));
    return item;
  }));
  $("results").hidden = false;
}

async function showLayer() {
  const layer = state.layers[Number($("layer").value)];
  if (!layer || !state.photo) return;
  const channels = Math.min(layer.output_shape[0], MAX_CHANNELS_SHOWN);
  const shape = layer.output_shape.join("x");
  const detail = layer.kernel ? ` · kernel ${layer.kernel.join("x")}, stride ${layer.stride.join("x")}` : "";
  $("layer-info").textContent = `${layer.operator} · output ${shape}${detail} · showing ${channels} of ${layer.output_shape[0]} channels`;
  const query = new URLSearchParams({ model: $("model").value, layer: layer.name, channels: `0-${channels - 1}` });
  const response = await call(`/featuremaps?${query}`, { method: "POST", body: photoForm() });
  showImage($("featuremap"), "featuremap", await response.blob());
  $("maps").hidden = false;
  await showExemplars(layer);
}

// The test images that excite a convolution's channel most (exemplars.json beside the model); a
// model without them, or a layer that is not a convolution, shows nothing.
async function showExemplars(layer) {
  const model = $("model").value;
  const select = $("excite-channel");
  if (layer.stage !== "convolution") { $("excite").hidden = true; return; }
  if (select.dataset.layer !== `${model}/${layer.name}`) {
    select.replaceChildren(...Array.from({ length: layer.output_shape[0] }, (_, k) => new Option(String(k), String(k))));
    select.dataset.layer = `${model}/${layer.name}`;
  }
  const query = new URLSearchParams({ channel: select.value || "0", format: "png" });
  const response = await fetch(`/models/${model}/layers/${encodeURIComponent(layer.name)}/exemplars?${query}`, { headers: headers() });
  $("excite").hidden = !response.ok;
  if (!response.ok) return;
  showImage($("excite-grid"), "excite", await response.blob());
  $("excite-caption").textContent = `The 9 Fashion-MNIST test images that excite channel ${select.value} of ${layer.name} most, best first: the patch of each that the channel's strongest position sees.`;
}

async function showCam() {
  const model = state.models[$("model").value];
  $("cam-section").hidden = !model.cam;
  if (!model.cam) return;
  const response = await call(`/cam?model=${model.name}`, { method: "POST", body: photoForm() });
  showImage($("cam"), "cam", await response.blob());
}

async function run() {
  say("Classifying…");
  try {
    const model = $("model").value;
    const response = await call(`/classify?model=${model}&top_k=5`, { method: "POST", body: photoForm() });
    drawBars((await response.json()).predictions);
    say("");
    await state.layersReady;
    await Promise.all([showLayer(), showCam()]);
  } catch (error) {
    say(error.message, true);
  }
}

function usePhoto(file) {
  if (!file) return;
  state.photo = file;
  showImage($("preview"), "preview", file);
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
  run();
}

function step(delta) {
  const select = $("layer");
  const next = Number(select.value) + delta;
  if (next < 0 || next >= state.layers.length) return;
  select.value = String(next);
  showLayer().catch((error) => say(error.message, true));
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => usePhoto(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    usePhoto(event.dataTransfer.files[0]);
  });
  $("model").addEventListener("change", () => {
    chooseModel().catch((error) => say(error.message, true));
    if (state.photo) run();
  });
  $("layer").addEventListener("change", () => showLayer().catch((error) => say(error.message, true)));
  $("excite-channel").addEventListener("change", () => showExemplars(state.layers[Number($("layer").value)]).catch((error) => say(error.message, true)));
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("api-key").addEventListener("change", () => loadModels().catch((error) => say(error.message, true)));
  takeTokenFromFragment();
  loadModels().catch((error) => say(`Could not list the models: ${error.message}`, true));
  const refresh = () => refreshModels().catch(() => {}); // a refused or failed listing keeps what is shown
  setInterval(refresh, REFRESH_MS);
  document.addEventListener("visibilitychange", refresh);
}

wire();
