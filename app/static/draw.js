"use strict";
// The drawing pad: write a digit with a mouse, a pen or a finger; the digits model (the first one
// whose model.json has input.digit) classifies it as one draws. The drawing goes through app.js's
// own path (state.photo, run(): the top-5 bars and the feature maps), and POST /preprocess shows
// the 28x28 field the network was given. Loaded after app.js, whose top-level names it uses; its
// own stay inside this function.

(() => {
  const pad = { model: null, drawing: false, dirty: false, busy: false, timer: 0, inked: false };
  const PAD_DEBOUNCE_MS = 200;

  function padCanvas() {
    return $("pad");
  }

  function padClear() {
    const canvas = padCanvas();
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    clearTimeout(pad.timer);
    pad.inked = false;
    $("given").hidden = true;
    $("given-caption").hidden = true;
  }

  // Pointer position in canvas pixels, whatever size CSS gives the canvas on the screen.
  function padPoint(event) {
    const canvas = padCanvas();
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * (canvas.width / box.width), (event.clientY - box.top) * (canvas.height / box.height)];
  }

  function padDown(event) {
    event.preventDefault();
    const canvas = padCanvas();
    canvas.setPointerCapture(event.pointerId);
    pad.drawing = true;
    const context = canvas.getContext("2d");
    context.lineWidth = canvas.width / 14;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.strokeStyle = "#111";
    context.beginPath();
    const [x, y] = padPoint(event);
    context.moveTo(x, y);
    context.lineTo(x, y);
    context.stroke();
    pad.inked = true;
    padChanged();
  }

  function padMove(event) {
    if (!pad.drawing) return;
    event.preventDefault();
    const context = padCanvas().getContext("2d");
    for (const each of event.getCoalescedEvents ? event.getCoalescedEvents() : [event]) {
      const [x, y] = padPoint(each);
      context.lineTo(x, y);
    }
    context.stroke();
    padChanged();
  }

  function padUp() {
    pad.drawing = false;
    padChanged();
  }

  // Debounced: a classification once the pen has paused for PAD_DEBOUNCE_MS, never two at once
  // (a change during one sends again when it is answered).
  function padChanged() {
    clearTimeout(pad.timer);
    pad.timer = setTimeout(padSend, PAD_DEBOUNCE_MS);
  }

  async function padSend() {
    if (!pad.inked || !pad.model) return;
    if (pad.busy) {
      pad.dirty = true;
      return;
    }
    pad.busy = true;
    try {
      if ($("model").value !== pad.model) {
        $("model").value = pad.model;
        await chooseModel();
      }
      const blob = await new Promise((resolve) => padCanvas().toBlob(resolve, "image/png"));
      state.photo = new File([blob], "drawing.png", { type: "image/png" });
      $("preview").hidden = true; // the bars are the drawing's now, not the photo's
      $("drop-hint").hidden = false;
      await Promise.all([run(), padShowGiven()]);
    } catch (error) {
      say(error.message, true);
    } finally {
      pad.busy = false;
      if (pad.dirty) {
        pad.dirty = false;
        padChanged();
      }
    }
  }

  async function padShowGiven() {
    const response = await call(`/preprocess?model=${pad.model}`, { method: "POST", body: photoForm() });
    const picture = await response.blob();
    if (!pad.inked) return; // cleared while it was on its way
    showImage($("given"), "given", picture);
    $("given").hidden = false;
    $("given-caption").hidden = false;
  }

  async function padFindModel() {
    const listing = await (await call("/models")).json();
    const digits = listing.models.find((m) => m.status === "ready" && m.input && m.input.digit);
    pad.model = digits ? digits.name : null;
    $("draw").hidden = !pad.model;
    if (pad.model) $("pad-model").textContent = pad.model;
  }

  function padWire() {
    const canvas = padCanvas();
    canvas.addEventListener("pointerdown", padDown);
    canvas.addEventListener("pointermove", padMove);
    canvas.addEventListener("pointerup", padUp);
    canvas.addEventListener("pointercancel", padUp);
    $("pad-clear").addEventListener("click", () => {
      padClear();
      say("Draw a digit.");
    });
    padClear();
    const find = () => padFindModel().catch(() => { $("draw").hidden = true; });
    $("api-key").addEventListener("change", find);
    find();
  }

  padWire();
})();
