// The chat page: keeps the conversation here, sends it whole to /v1/chat/completions and streams the reply.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), form = $("form"), input = $("input"), length = $("length");
const sendButton = $("send"), stopButton = $("stop");
let history = [];       // [{role, content}] as the API takes it
let controller = null;  // aborts the running request; the server cancels the generation when the connection closes

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.append(span);
}

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
}

// POST with the API key the user gave, asking for one when the server answers 401.
async function post(body, signal) {
  for (let attempt = 0; ; attempt++) {
    const headers = { "Content-Type": "application/json" };
    const key = localStorage.getItem("finechat-api-key");
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch("/v1/chat/completions", { method: "POST", headers, body, signal });
    if (res.status !== 401 || attempt > 0) return res;
    const given = prompt("This server needs its API key (finechat serve --api-key):");
    if (!given) return res;
    localStorage.setItem("finechat-api-key", given);
  }
}

// Yields the parsed `data:` events of a server-sent event stream.
async function* events(res) {
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (frame.startsWith("data: ") && frame !== "data: [DONE]") yield JSON.parse(frame.slice(6));
    }
  }
}

async function ask(text) {
  const turns = history;  // "Clear chat" starts a new array, so a reply that ends later can't leak into it
  turns.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  let answer = "";
  try {
    const body = JSON.stringify({
      messages: turns, stream: true, length: length.value, stop_at_punctuation: true, temperature: 0,
    });
    const res = await post(body, controller.signal);
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error(err.error?.message || `HTTP ${res.status}`);
    }
    for await (const event of events(res)) {
      if (event.error) throw new Error(event.error.message);
      const piece = event.choices[0]?.delta?.content;
      if (piece) {
        answer += piece;
        reply.textContent = answer;
        log.scrollTop = log.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") note(reply, "stopped");
    else { reply.classList.add("error"); note(reply, e.message); }
  } finally {
    reply.classList.remove("streaming");
    // A stopped reply stays in the conversation as far as it got; a turn with no reply is dropped.
    if (answer) turns.push({ role: "assistant", content: answer });
    else turns.pop();
    controller = null;
    setBusy(false);
    input.focus();
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  ask(text);
});

input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => controller?.abort());

$("clear").addEventListener("click", () => {
  controller?.abort();
  history = [];
  log.replaceChildren();
  input.focus();
});

fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = h.model; }).catch(() => {});
