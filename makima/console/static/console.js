// makima console: post actions and show the answer inline; load diffs when opened;
// follow a directive's events (server-sent) and re-render its live part.
"use strict";

async function send(url, form, button) {
  const answer = form.querySelector(".answer");
  const body = new FormData(form);
  if (button && button.name) body.set(button.name, button.value);
  answer.className = "answer pending";
  answer.textContent = "sending…";
  let reply;
  try {
    const response = await fetch(url, {method: "POST", body, headers: {"X-Makima-Console": "1"}});
    reply = await response.json();
  } catch (error) {
    reply = {ok: false, message: "no answer from the console: " + error};
  }
  answer.className = "answer " + (reply.ok ? "ok" : "refused");
  answer.textContent = reply.message;
  if (reply.ok) form.querySelectorAll("textarea, input:not([type=hidden])").forEach((f) => { f.value = ""; });
  return reply;
}

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.matches("form.act, form.decide")) return;
  event.preventDefault();
  const button = event.submitter;
  const url = form.dataset.action || form.dataset.actionBase + button.value;
  form.dataset.busy = "1";
  send(url, form, button).finally(() => { delete form.dataset.busy; refreshSoon(); });
});

document.addEventListener("toggle", async (event) => {
  const details = event.target;
  if (!details.matches || !details.matches("details.diff") || !details.open || details.dataset.loaded) return;
  details.dataset.loaded = "1";
  const response = await fetch(details.dataset.src);
  details.querySelector(".diff-body").innerHTML = await response.text();
}, true);

let timer = null;
function refreshSoon() {
  const live = document.getElementById("live");
  if (!live) return;
  clearTimeout(timer);
  timer = setTimeout(async () => {
    // never throw away what a person is typing or sending
    const typing = [...live.querySelectorAll("textarea, input")].some((f) => f.value && f.type !== "hidden");
    if (typing || live.querySelector("form[data-busy]")) { refreshSoon(); return; }
    const open = new Set([...live.querySelectorAll("details[open]")].map(keyOf));
    const answers = [...live.querySelectorAll(".answer")].filter((a) => a.textContent).map((a) => a.outerHTML);
    const response = await fetch(live.dataset.src);
    if (!response.ok) return;
    live.innerHTML = await response.text();
    live.querySelectorAll("details").forEach((d) => { if (open.has(keyOf(d))) d.open = true; });
    if (answers.length) live.insertAdjacentHTML("afterbegin", answers.join(""));
  }, 250);
}

function keyOf(details) {
  const step = details.closest("section.step");
  return (step ? step.id : "") + "|" + details.querySelector("summary").textContent.trim().slice(0, 40);
}

window.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  const log = document.getElementById("events");
  const stream = new EventSource(live.dataset.events);
  stream.onmessage = (message) => {
    const event = JSON.parse(message.data);
    log.textContent += event.line + "\n";
    refreshSoon();
  };
});
