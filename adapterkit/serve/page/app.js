// adapterkit serve's page: plain JS against the same HTTP API as curl (POST /v1/edit returns the PNG, with the
// routing decision and timings in X-Adapterkit-* headers).
"use strict";

const $ = (id) => document.getElementById(id);
let inputBlob = null;

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function loadLists() {
  const health = await (await fetch("/healthz")).json();
  $("health").textContent = `${health.adapters} adapter(s), ${health.queue_depth} waiting`;
  const adapters = (await (await fetch("/v1/adapters")).json()).adapters;
  for (const a of adapters) {
    const option = new Option(`${a.name} (${a.method})`, a.name);
    option.title = a.instructions.join("; ");
    $("adapter").add(option);
  }
  if (!$("instruction").value && adapters.length) $("instruction").value = adapters[0].instructions[0] || "";
  const samples = (await (await fetch("/v1/samples")).json()).samples;
  for (const name of samples) $("sample").add(new Option(name, name));
  if (samples.length && !inputBlob) {  // a first visit can press Edit at once
    $("sample").value = samples[0];
    await useSample();
  }
}

function setInput(blob) {
  inputBlob = blob;
  $("input-preview").src = URL.createObjectURL(blob);
  $("input-figure").hidden = false;
  $("output-figure").hidden = true;  // an output of another input would mislead
}

async function useSample() {
  const name = $("sample").value;
  if (!name) return;
  const blob = await (await fetch(`/v1/samples/${encodeURIComponent(name)}`)).blob();
  if ($("sample").value === name) setInput(blob);  // an upload while it loaded (it clears the choice) wins
}

$("image-file").addEventListener("change", () => {
  if ($("image-file").files.length) { $("sample").value = ""; setInput($("image-file").files[0]); }
});

$("sample").addEventListener("change", useSample);

function formFor(adapter) {
  const form = new FormData();
  form.append("image", inputBlob, "input.png");
  form.append("instruction", $("instruction").value);
  form.append("adapter", adapter);
  for (const [field, id] of [["seed", "seed"], ["steps", "steps"], ["guidance", "guidance"],
                             ["image_guidance", "image-guidance"], ["resolution", "resolution"]]) {
    if ($(id).value !== "") form.append(field, $(id).value);
  }
  return form;
}

// One edit: {url, caption} of the result, or throws the server's one-line error.
async function runEdit(adapter) {
  const response = await fetch("/v1/edit", { method: "POST", body: formFor(adapter) });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message += ": " + (await response.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  const h = (name) => response.headers.get(`X-Adapterkit-${name}`);
  const routed = h("Routed") === "true";
  const score = h("Score") && h("Score") !== "null" ? ` (cosine ${Number(h("Score")).toFixed(3)})` : "";
  const caption = `${h("Adapter")}${routed ? " - routed" + score : ""}; ${h("Total-Ms")} ms ` +
                  `(queue ${h("Queue-Ms")}, compute ${h("Compute-Ms")}, batch of ${h("Batch-Size")})`;
  return { url: URL.createObjectURL(await response.blob()), caption };
}

$("edit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  if (!inputBlob) return showError("choose an image or a sample first");
  $("status").textContent = "editing...";
  try {
    const result = await runEdit($("adapter").value);
    $("output").src = result.url;
    $("route").textContent = result.caption;
    $("output-figure").hidden = false;
    $("status").textContent = "done";
  } catch (e) {
    showError(e.message);
    $("status").textContent = "";
  }
});

$("compare").addEventListener("click", async () => {
  showError("");
  if (!inputBlob) return showError("choose an image or a sample first");
  const names = ["base", ...Array.from($("adapter").options).map((o) => o.value).filter((v) => v !== "auto" && v !== "base")];
  const grid = $("compare-grid");
  grid.replaceChildren();
  $("status").textContent = `editing with ${names.length} adapters (sent together: the server batches them)...`;
  const results = await Promise.allSettled(names.map((name) => runEdit(name)));
  results.forEach((r, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    const caption = document.createElement("figcaption");
    img.alt = names[i];
    img.dataset.adapter = names[i];
    if (r.status === "fulfilled") { img.src = r.value.url; caption.textContent = r.value.caption; }
    else caption.textContent = `${names[i]}: ${r.reason.message}`;
    figure.append(img, caption);
    grid.append(figure);
  });
  $("status").textContent = "compare done";
});

loadLists().catch((e) => showError(`cannot reach the server: ${e.message}`));
