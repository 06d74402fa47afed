// The lavin-edge web page: conversations against the OpenAI-compatible v1/chat/completions, streamed over
// server-sent events. One image per conversation (the prompt format has one image slot, at its start), so a
// second image starts a new conversation below the first. The conversation and the settings stay in this
// browser (localStorage; the API key in sessionStorage) until "New conversation". No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = { conversation: "lavin-edge.conversation", settings: "lavin-edge.settings", key: "lavin-edge.api-key" };
const DEMO_ID = "lavin-edge-demo";
const EXAMPLES = [["easyvqa-red-triangle.png", "red triangle"], ["easyvqa-yellow-rectangle.png", "yellow rectangle"],
  ["easyvqa-brown-circle.png", "brown circle"], ["easyvqa-black-rectangle.png", "black rectangle"]];
const SUGGESTIONS = ["What shape is in the image?", "What colour is the shape?", "Is there a red shape?",
  "Is there not a circle?"];
// Formats the server decodes as they are; any other picture the browser can show is sent as PNG.
const SERVER_FORMATS = ["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"];
const SETTING_IDS = ["system", "max-tokens", "temperature"];

let convs = [];          // [{image: data URL or null, turns: [{q, a, status, image?, error?}]}], the last one current
let attachment = null;   // {url, name, note}: the image for the next question
let controller = null;   // the streaming request's AbortController
let modelSeq = 0;        // only the newest model-label request may set the label
let stick = true;        // the log follows new text while the reader is at its bottom

// -- small helpers --------------------------------------------------------------------------------------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function save() {
  try {
    localStorage.setItem(STORE.conversation, JSON.stringify(convs));
  } catch (e) { /* over the browser's quota (a large image): the page still works, a reload forgets */ }
}

// -- the model label ------------------------------------------------------------------------------------
function setModel(text, state) {
  $("model").textContent = text;
  $("dot").className = "dot " + (state || "");
}

async function refreshModel() {
  const seq = ++modelSeq;
  const hadKey = !!$("api-key").value.trim();
  let text, state;
  try {
    const r = await fetch("v1/models", { headers: headers() });
    if (r.status === 401) {
      [text, state] = [hadKey ? "API key not accepted: check it in Settings" : "this server needs an API key: enter it in Settings", "warn"];
    } else {
      const j = await r.json();
      [text, state] = [j.data[0].id, "ok"];
    }
  } catch (e) {
    [text, state] = ["server not reachable: is lavin-edge serve running?", "bad"];
  }
  if (seq !== modelSeq) return;
  setModel(text, state);
  $("api-key").classList.toggle("needed", state === "warn");
  $("hint").textContent = text === DEMO_ID
    ? "This demo model knows pictures of one coloured shape, like these examples: ask which shape (circle, " +
      "rectangle, triangle) or colour it is, or a yes/no question such as \u201cIs there not a red shape?\u201d. " +
      "Without an image it chats as a small language model (135M parameters)."
    : "Pick an example, attach a picture (or drop or paste one) and ask about it, or just ask a question.";
}

// -- rendering the conversation ------------------------------------------------------------------------
function render() {
  const log = $("log");
  log.textContent = "";
  convs.forEach((conv, i) => {
    if (i > 0) log.append(el("div", "divider", "New image: a new conversation"));
    for (const t of conv.turns) log.append(turnElement(conv, t));
  });
  const empty = !convs.some((c) => c.turns.length);
  $("welcome").hidden = !empty;
  log.hidden = empty;
  stick = true;
  follow();
}

function follow() {
  if (stick) $("log").scrollTop = $("log").scrollHeight;
}

function turnElement(conv, t) {
  const turn = el("div", "turn");
  if (t.image && conv.image) {
    const fig = el("div", "conv-image");
    const img = el("img");
    img.src = conv.image;
    img.alt = "the image of this conversation";
    fig.append(img);
    turn.append(fig);
  }
  turn.append(el("div", "q", t.q), el("div", "a"), el("div", "status"));
  showAnswer(turn, t);
  return turn;
}

function showAnswer(turn, t) {
  const a = turn.querySelector(".a");
  const status = turn.querySelector(".status");
  a.className = "a";
  a.dataset.state = t.status;
  a.textContent = t.status === "error" ? "" : t.a.trimStart();
  status.textContent = "";
  if (t.status === "streaming") {
    delete a.dataset.done;
    return;
  }
  a.dataset.done = "1";
  if (t.status === "stopped") status.textContent = "Stopped.";
  else if (t.status === "done" && !t.a.trim()) status.textContent = "The model gave an empty answer.";
  if (t.status !== "error") return;
  a.classList.add("error");
  a.append(el("span", "sentence", t.error.sentence));
  if (t.error.detail) {
    const d = el("details");
    d.append(el("summary", "", "Details"), el("div", "", t.error.detail));
    a.append(d);
  }
}

// -- asking ---------------------------------------------------------------------------------------------
// The request's messages: the system prompt, the turns that were answered (a failed turn is not part of
// the conversation) and the new question; the conversation's image goes with its first user message.
function messagesFor(conv, question) {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  let image = conv.image;
  const user = (text) => {
    if (!image) return { role: "user", content: text };
    const content = [{ type: "text", text }, { type: "image_url", image_url: { url: image } }];
    image = null;
    return { role: "user", content };
  };
  for (const t of conv.turns) {
    if (t.status === "done" || (t.status === "stopped" && t.a)) out.push(user(t.q), { role: "assistant", content: t.a });
  }
  out.push(user(question));
  return out;
}

function readSettings() {
  const maxTokens = Number($("max-tokens").value);
  const temperature = Number($("temperature").value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) {
    return [null, "Max tokens (in Settings) must be a whole number of 1 or more."];
  }
  if ($("temperature").value.trim() === "" || !(temperature >= 0 && temperature <= 2)) {
    return [null, "Temperature (in Settings) must be a number from 0 to 2."];
  }
  return [{ max_tokens: maxTokens, temperature }, null];
}

// An HTTP error from the server -> a sentence for the user (the server's own wording goes under Details).
// ask: {hadKey, followUp}: whether an API key was sent, whether the question followed answered turns.
function plainError(status, err, ask) {
  const code = (err && err.code) || "";
  const msg = (err && err.message) || "";
  if (status === 401) {
    return ask.hadKey ? "The server did not accept this API key. Check it in Settings, then ask again."
      : "This server needs an API key. Enter it in Settings, then ask again.";
  }
  if (status === 503) return "The server is busy with other requests. Wait a moment, then ask again.";
  if (status === 413 || code === "image_too_large") return "The image is too large for this server. Attach a smaller picture.";
  if (code === "invalid_image" || code === "invalid_base64") return "The server could not read the image. Try another picture (PNG or JPEG).";
  if (code === "context_length_exceeded") {
    return ask.followUp ? "This conversation is longer than the model can read. Start a new conversation."
      : "This question is longer than the model can read. Ask a shorter one.";
  }
  if (code === "too_many_images") return "The model takes one image per conversation. Start a new conversation for another image.";
  if (/vision tower/.test(msg)) return "This model cannot see images. Start a new conversation without an image.";
  if (status >= 500) return "The model failed while answering. The server keeps running: ask again.";
  return "The server could not take this question.";
}

class ServerError extends Error {
  constructor(sentence, detail, imageRefused = false) {
    super(sentence);
    this.detail = detail;
    this.imageRefused = imageRefused;
  }
}

const IMAGE_CODES = ["image_too_large", "invalid_image", "invalid_base64", "request_too_large"];

async function ask(question) {
  const [params, problem] = readSettings();
  if (problem) {
    notice(problem);
    $("settings").open = true;
    return false;
  }
  let conv = convs[convs.length - 1];
  if (!conv || (attachment && conv.image)) {
    conv = { image: null, turns: [] };
    convs.push(conv);
  }
  const turn = { q: question, a: "", status: "streaming" };
  if (attachment) {
    conv.image = attachment.url;
    turn.image = true;
    setAttachment(null);
  }
  const body = { messages: messagesFor(conv, question), stream: true, ...params };
  conv.turns.push(turn);
  render();
  save();
  const turnEl = $("log").lastElementChild;
  const context = { hadKey: !!$("api-key").value.trim(), followUp: body.messages.some((m) => m.role === "assistant") };
  controller = new AbortController();
  setBusy(true);
  try {
    await stream(body, controller.signal, context, (text) => {
      turn.a += text;
      showAnswer(turnEl, turn);
      follow();
    });
    turn.status = "done";
  } catch (err) {
    if (controller.signal.aborted) {
      turn.status = "stopped";
    } else {
      turn.status = "error";
      turn.error = err instanceof ServerError ? { sentence: err.message, detail: err.detail }
        : { sentence: "The connection to the server was lost. Is lavin-edge serve still running?", detail: String(err) };
      if (!$("question").value) {  // ready to ask again
        $("question").value = question;
        $("question").dispatchEvent(new Event("input"));
      }
      if (err.imageRefused && turn.image) {  // the next question goes without it (or with another image)
        conv.image = null;
        turn.image = false;
      }
      if (/API key/.test(turn.error.sentence)) {
        $("settings").open = true;
        refreshModel();
      }
    }
  } finally {
    controller = null;
    setBusy(false);
    showAnswer(turnEl, turn);
    follow();
    save();
  }
  return true;
}

// POST the request and call onText with each piece of the answer as it streams in.
async function stream(body, signal, context, onText) {
  const resp = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!resp.ok) {
    let err = null;
    try { err = (await resp.json()).error; } catch (e) { /* not JSON */ }
    const refused = resp.status === 413 || (!!err && (IMAGE_CODES.includes(err.code) || /image_url/.test(err.param || "")));
    throw new ServerError(plainError(resp.status, err, context), `HTTP ${resp.status}: ${err ? err.message : resp.statusText}`,
      refused);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const obj = JSON.parse(line.slice(6));
        if (obj.error) throw new ServerError(plainError(500, obj.error, context), obj.error.message);
        if (obj.model && $("dot").className !== "dot ok") setModel(obj.model, "ok");
        const delta = obj.choices.length ? obj.choices[0].delta.content : null;
        if (delta) onText(delta);
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (!busy && document.activeElement === $("stop")) $("question").focus();
}

function newConversation() {
  if (controller) controller.abort();
  convs = [];
  setAttachment(null);
  notice("");
  save();
  render();
  $("question").focus();
}

// -- images: file picker, examples, drag-and-drop, paste -----------------------------------------------
function setAttachment(a) {
  attachment = a;
  $("attachment").hidden = !a;
  if (!a) {
    $("preview").removeAttribute("src");
    return;
  }
  $("preview").src = a.url;
  $("image-name").textContent = a.name;
  const conv = convs[convs.length - 1];
  const more = conv && conv.image ? " · sending starts a new conversation (one image per conversation)" : "";
  $("image-note").textContent = a.note + more;
}

const readDataUrl = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

const loadImage = (url) => new Promise((resolve, reject) => {
  const img = new Image();
  img.onload = () => resolve(img);
  img.onerror = () => reject(new Error("not decodable"));
  img.src = url;
});

// Check in the page that the file is a picture (nothing is sent otherwise) and make it the attachment.
async function attachFile(file) {
  notice("");
  const name = file.name || "pasted image";
  if (!file.type.startsWith("image/")) {
    notice(`\u201c${name}\u201d is not an image. Choose a picture (PNG, JPEG, GIF, WebP or BMP).`);
    return;
  }
  let url, img;
  try {
    url = await readDataUrl(file);
    img = await loadImage(url);
  } catch (e) {
    notice(`\u201c${name}\u201d could not be opened as an image (the file may be damaged). Choose another picture.`);
    return;
  }
  const w = img.naturalWidth || 512, h = img.naturalHeight || 512;
  let note = `${w}\u00d7${h}`;
  if (!SERVER_FORMATS.includes(file.type)) {
    const canvas = el("canvas");
    [canvas.width, canvas.height] = [w, h];
    canvas.getContext("2d").drawImage(img, 0, 0, w, h);
    url = canvas.toDataURL("image/png");
    note += ", sent as PNG";
  }
  setAttachment({ url, name, note });
  $("question").focus();
}

async function attachExample(name) {
  try {
    const r = await fetch("static/examples/" + name);
    if (!r.ok) throw new Error(r.statusText);
    await attachFile(new File([await r.blob()], name, { type: "image/png" }));
  } catch (e) {
    notice("The example image could not be loaded from the server.");
    return;
  }
  if (!$("question").value.trim()) {
    $("question").value = SUGGESTIONS[0];
    $("question").select();
  }
}

function firstFile(files) {
  const list = Array.from(files || []);
  return list.find((f) => f.type.startsWith("image/")) || list[0];
}

const carriesFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files");
let dragDepth = 0;

function setupImages() {
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    $("image").value = "";  // choosing the same file again fires "change" again
    if (file) attachFile(file);
  });
  $("remove-image").addEventListener("click", () => setAttachment(null));
  for (const [file, label] of EXAMPLES) {
    const b = el("button");
    b.type = "button";
    b.title = "Attach this example image";
    const img = el("img");
    img.src = "static/examples/" + file;
    img.alt = "";
    b.append(img, el("span", "", label));
    b.addEventListener("click", () => attachExample(file));
    $("examples").append(b);
  }
  for (const q of SUGGESTIONS) {
    const b = el("button", "", q);
    b.type = "button";
    b.addEventListener("click", () => { $("question").value = q; $("question").focus(); });
    $("suggestions").append(b);
  }
  // Dropping a file anywhere attaches it (and never navigates away from the conversation).
  document.addEventListener("dragenter", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    $("drop").hidden = false;
  });
  document.addEventListener("dragleave", (e) => {
    if (!carriesFiles(e)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) $("drop").hidden = true;
  });
  document.addEventListener("dragover", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    $("drop").hidden = true;
    const file = firstFile(e.dataTransfer.files);
    if (file) attachFile(file);
  });
  document.addEventListener("paste", (e) => {
    const file = e.clipboardData && firstFile(e.clipboardData.files);
    if (!file) return;  // text pastes as usual
    e.preventDefault();
    attachFile(file);
  });
}

// -- settings -------------------------------------------------------------------------------------------
function settingsSummary() {
  const sys = $("system").value.trim() ? " \u00b7 system prompt" : "";
  return `${$("max-tokens").value} tokens \u00b7 temperature ${$("temperature").value}${sys}`;
}

function setupSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE.settings) || "{}");
    for (const id of SETTING_IDS) if (typeof saved[id] === "string") $(id).value = saved[id];
    $("api-key").value = sessionStorage.getItem(STORE.key) || "";
  } catch (e) { /* storage unavailable: defaults */ }
  const changed = () => {
    const values = Object.fromEntries(SETTING_IDS.map((id) => [id, $(id).value]));
    try { localStorage.setItem(STORE.settings, JSON.stringify(values)); } catch (e) { /* not kept */ }
    $("settings-summary").textContent = settingsSummary();
  };
  for (const id of SETTING_IDS) $(id).addEventListener("input", changed);
  changed();
  let timer = null;
  $("api-key").addEventListener("input", () => {
    try { sessionStorage.setItem(STORE.key, $("api-key").value); } catch (e) { /* not kept */ }
    clearTimeout(timer);
    timer = setTimeout(refreshModel, 250);
  });
  // Wide windows show the settings beside the conversation; narrow ones fold them under one line.
  const wide = window.matchMedia("(min-width: 761px)");
  $("settings").open = wide.matches;
  wide.addEventListener("change", () => { $("settings").open = wide.matches; });
}

// -- start ----------------------------------------------------------------------------------------------
function setupComposer() {
  const q = $("question");
  const grow = () => { q.style.height = "auto"; q.style.height = q.scrollHeight + "px"; };
  q.addEventListener("input", grow);
  q.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && controller) controller.abort(); });
  $("ask").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const question = q.value.trim();
    if (controller) {  // one answer at a time
      notice("An answer is still coming: wait for it, or press Stop.");
      return;
    }
    if (!question) {
      notice(attachment ? "Type a question about the image." : "");
      return;
    }
    notice("");
    q.value = "";
    grow();
    if (!(await ask(question))) q.value = question;
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  const log = $("log");
  log.addEventListener("scroll", () => { stick = log.scrollHeight - log.scrollTop - log.clientHeight < 40; });
  window.addEventListener("resize", follow);
  $("reset").addEventListener("click", newConversation);
}

function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE.conversation) || "[]");
    if (Array.isArray(saved)) convs = saved;
  } catch (e) { convs = []; }
  for (const conv of convs) {  // an answer cut off by a reload stays as far as it came
    for (const t of conv.turns) if (t.status === "streaming") t.status = "stopped";
  }
  render();
}

setupSettings();
setupImages();
setupComposer();
restore();
refreshModel();
window.addEventListener("focus", refreshModel);
