// The lavin-edge web page: one conversation (about at most one image) against /v1/chat/completions,
// streamed over server-sent events. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
let imageUrl = null;   // data URL of the chosen image
let messages = [];     // the conversation so far, in OpenAI's message format

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function newConversation() {
  messages = [];
  $("log").textContent = "";
}

$("reset").addEventListener("click", newConversation);

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    imageUrl = reader.result;
    $("preview").src = imageUrl;
    $("preview").style.display = "block";
    newConversation();
  };
  reader.readAsDataURL(file);
});

function addTurn(question) {
  const turn = document.createElement("div");
  turn.className = "turn";
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = question;
  const a = document.createElement("div");
  a.className = "a";
  turn.append(q, a);
  $("log").append(turn);
  return a;
}

async function ask(question) {
  const content = [{ type: "text", text: question }];
  if (imageUrl && messages.length === 0) content.push({ type: "image_url", image_url: { url: imageUrl } });
  const userMsg = { role: "user", content };
  const answerEl = addTurn(question);
  const body = {
    messages: messages.concat([userMsg]),
    stream: true,
    max_tokens: parseInt($("max-tokens").value, 10) || 128,
    temperature: parseFloat($("temperature").value) || 0,
  };
  $("send").disabled = true;
  let answer = "";
  try {
    const resp = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!resp.ok) {
      let msg = resp.status + " " + resp.statusText;
      try { msg = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const delta = obj.choices.length ? obj.choices[0].delta.content : null;
          if (delta) {
            answer += delta;
            answerEl.textContent = answer.trimStart();
          }
        }
      }
    }
    messages.push(userMsg, { role: "assistant", content: answer });
    answerEl.dataset.done = "1";
  } catch (err) {
    answerEl.className = "a error";
    answerEl.textContent = "error: " + err.message;
    answerEl.dataset.done = "1";
  } finally {
    $("send").disabled = false;
  }
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("question").value = "";
  ask(question);
});

fetch("v1/models", { headers: headers() })
  .then((r) => r.json())
  .then((j) => { $("model").textContent = j.data ? j.data[0].id : "(needs an API key)"; })
  .catch(() => { $("model").textContent = "(unreachable)"; });
