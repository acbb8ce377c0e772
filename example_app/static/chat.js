// The example chat room: plain JavaScript, no build step.
// Your messages arrive on /users/<you>/events (Server-Sent Events); sending POSTs /messages;
// the health panel reads /healthz every 2 s.
"use strict";

const config = JSON.parse(document.getElementById("chat-config").textContent);
const meSelect = document.getElementById("me");
const messages = document.getElementById("messages");
const streamStatus = document.getElementById("stream-status");
let stream = null;

function setStatus(element, text, state) {
  element.textContent = text;
  element.className = `status ${state}`;
}

function addMessage(entry) {
  const sent = entry.from === meSelect.value;
  const toAll = entry.via === "all" || entry.to === "all";
  const item = document.createElement("li");
  if (sent) item.classList.add("sent");
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = sent ? `you → ${toAll ? "everyone" : entry.to}` : `${entry.from}${toAll ? " → everyone" : ""}`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = entry.text;
  const when = document.createElement("span");
  when.className = "when";
  when.textContent = new Date((entry.sent_at || Date.now() / 1000) * 1000).toLocaleTimeString();
  item.append(who, text, when);
  messages.append(item);
  messages.scrollTop = messages.scrollHeight;
}

function listen(user) {
  if (stream) stream.close();
  messages.replaceChildren();
  setStatus(streamStatus, "connecting…", "connecting");
  stream = new EventSource(`/users/${encodeURIComponent(user)}/events`);
  stream.addEventListener("ready", () => setStatus(streamStatus, `live: ${user}'s inbox`, "live"));
  stream.onmessage = (event) => addMessage(JSON.parse(event.data));
  stream.onerror = () => setStatus(streamStatus, "reconnecting…", "down");
  const url = new URL(window.location);
  url.searchParams.set("user", user);
  window.history.replaceState(null, "", url);
  document.title = `${user} · ${config.room}`;
}

document.getElementById("send").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("text");
  const to = document.getElementById("to").value;
  const error = document.getElementById("send-error");
  const entry = { from: meSelect.value, to, text: input.value };
  const response = await fetch("/messages", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(entry),
  });
  if (response.status === 202) {
    error.hidden = true;
    input.value = "";
    if (to !== "all" && to !== entry.from) addMessage(entry);  // to yourself or all: back on the stream
  } else {
    error.hidden = false;
    error.textContent = `not sent: ${(await response.json()).error || response.status}`;
  }
});

function cell(row, text, state) {
  const td = row.insertCell();
  td.textContent = text;
  if (state) td.className = state;
}

async function refreshHealth() {
  const ok = document.getElementById("health-ok");
  try {
    const report = await (await fetch("/healthz")).json();
    setStatus(ok, report.ok ? "ok" : "degraded", report.ok ? "ok" : "down");
    const pools = document.querySelector("#pools tbody");
    pools.replaceChildren();
    for (const [name, pool] of Object.entries(report.pools)) {
      const row = pools.insertRow();
      cell(row, name);
      cell(row, pool.ok ? (pool.blocked ? "blocked" : "up") : `down${pool.error ? ": " + pool.error : ""}`,
           pool.ok && !pool.blocked ? "ok" : "down");
      cell(row, `${pool.open}/${pool.size}`);
      cell(row, pool.server || pool.broker);
    }
    const listeners = document.querySelector("#listeners tbody");
    listeners.replaceChildren();
    for (const listener of report.listeners) {
      const row = listeners.insertRow();
      const stats = (report.listener_stats || {})[listener.queue] || {};
      cell(row, listener.queue);
      cell(row, listener.consuming ? "consuming" : "stopped", listener.consuming ? "ok" : "down");
      cell(row, stats.handled ?? "");
    }
    document.getElementById("pid").textContent = report.pid;
  } catch (error) {
    setStatus(ok, "no answer", "down");
  }
}

const requested = new URL(window.location).searchParams.get("user");
if (config.users.includes(requested)) meSelect.value = requested;
meSelect.addEventListener("change", () => listen(meSelect.value));
listen(meSelect.value);
refreshHealth();
setInterval(refreshHealth, 2000);
