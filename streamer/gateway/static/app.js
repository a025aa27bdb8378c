// sam3-stream operator page: live composited video over WebRTC, prompts over the "prompts" data channel.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video");
const DRAG_MIN_PX = 6;

let pc = null;
let channel = null;
let frame = null;          // the newest "objects" message: frame size, index and objects
let selected = null;       // obj_id that clicks refine; null makes a new object
let objectsKey = "";
let conceptsKey = "";
const concepts = new Set();  // text prompts this page added (the tracker's own show up as labels)
const pending = new Map();   // request id -> what to do when the tracker accepts it
let requestCount = 0;
let retryDelay = 1000;
let reconnectTimer = null;

// Logged in by /?token=: the session cookie is set, so the token leaves the address bar (and history).
if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);

// ---- connection -------------------------------------------------------------------------------

async function connect() {
  clearTimeout(reconnectTimer);
  if (pc) pc.close();
  setBadge("connection", "connecting");
  pc = new RTCPeerConnection({ iceServers: [] });
  const myPc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  channel = pc.createDataChannel("prompts");
  channel.onmessage = (event) => onMessage(JSON.parse(event.data));
  channel.onclose = () => { if (myPc === pc) scheduleReconnect(); };  // the gateway closed or restarted
  pc.ontrack = (event) => {
    video.srcObject = event.streams[0] || new MediaStream([event.track]);
    video.play().catch(() => {});
  };
  pc.onconnectionstatechange = () => {
    if (myPc !== pc) return;
    setBadge("connection", pc.connectionState);
    if (pc.connectionState === "connected") retryDelay = 1000;
    if (["failed", "closed"].includes(pc.connectionState)) scheduleReconnect();
    if (pc.connectionState === "disconnected") scheduleReconnect(3000);  // give it a chance to recover
  };
  $("auth").hidden = true;
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc);  // the gateway takes no trickled candidates: send them all at once
    const response = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
    if (response.status === 401 || response.status === 403) {
      refused(response.status, await response.json().catch(() => ({})));
      return;  // retrying cannot help: a person must log in (or open the page by its own address)
    }
    if (!response.ok) throw new Error(`offer: HTTP ${response.status} ${await response.text()}`);
    await pc.setRemoteDescription(await response.json());
  } catch (error) {
    if (myPc !== pc) return;
    note(`connect: ${error.message}`, true);
    setBadge("connection", "failed");
    scheduleReconnect();
  }
}

// The gateway refused this page: say why and how to get in, and stop reconnecting.
function refused(status, answer) {
  clearTimeout(reconnectTimer);
  pc.close();
  setBadge("connection", "refused");
  // Nothing shown any more is known: no feed state, objects or rates from a connection that is gone.
  $("state").textContent = $("fps").textContent = $("latency").textContent = "–";
  $("state").className = "badge";
  frame = null;
  renderObjects([]);
  renderConcepts();
  const banner = $("auth");
  if (status === 401) {
    banner.replaceChildren("Not authorised: this gateway needs its token (the session may have ended or the " +
      "token changed). ", Object.assign(document.createElement("a"), { href: "/login", textContent: "Log in" }));
  } else {
    banner.textContent = `Refused by the gateway: ${answer.error || `HTTP ${status}`}`;
  }
  banner.hidden = false;
  note(`connect: ${answer.error || `HTTP ${status}`}`, true);
}

function gatheringComplete(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    peer.addEventListener("icegatheringstatechange", () => {
      if (peer.iceGatheringState === "complete") resolve();
    });
  });
}

function scheduleReconnect(delay = retryDelay) {
  clearTimeout(reconnectTimer);
  reconnectTimer = setTimeout(() => {
    if (pc && pc.connectionState === "connected" && channel.readyState === "open") return;
    retryDelay = Math.min(retryDelay * 2, 5000);
    connect();
  }, delay);
}

// ---- messages from the gateway ----------------------------------------------------------------

function onMessage(message) {
  if (message.type === "objects") {
    frame = message;
    $("fps").textContent = rate(message.fps);
    $("latency").textContent = `${Math.round(message.latency_ms)} ms`;
    renderObjects(message.objects);
    renderConcepts();
  } else if (message.type === "status") {
    setBadge("state", message.state);
    if (message.state !== "live") renderObjects([]);
  } else if (message.type === "answer") {
    const onAccepted = pending.get(message.id);
    pending.delete(message.id);
    if (onAccepted && message.ok) onAccepted(message);
    const ids = message.obj_ids && message.obj_ids.length ? ` → objects ${message.obj_ids.join(", ")}` : "";
    note(message.ok ? `${message.id}: ok${ids}${placement(message)}` : `${message.id ?? "?"}: ${message.error}`, !message.ok);
  } else if (message.type === "event") {
    // A prompt that failed when applied, objects re-acquired after a tracker restart, objects left out.
    const about = message.id !== null && message.id !== undefined ? `${message.id}: ` : "";
    note(`${about}${message.event.replaceAll("_", " ")}: ${message.message}`, message.event === "prompt_failed");
  }
}

// Enough digits that a slow but moving feed never reads 0.0.
function rate(fps) {
  return fps >= 10 ? fps.toFixed(0) : fps >= 1 ? fps.toFixed(1) : fps > 0 ? fps.toPrecision(2) : "0";
}

// Where the tracker put a click or box drawn on a past frame, when that is not the frame it was drawn on.
function placement(answer) {
  const given = (value) => value !== null && value !== undefined;
  // Later than asked only when the frame drawn on has left the tracker's ring (earlier: a frame it skipped).
  if (!given(answer.requested) || !given(answer.placed_on) || answer.placed_on <= answer.requested) return "";
  return ` (frame ${answer.requested} is older than the tracker keeps: placed on frame ${answer.placed_on})`;
}

function renderObjects(objects) {
  const key = objects.map((o) => `${o.obj_id}:${o.label}`).join("|") + `#${selected}`;
  if (key === objectsKey) {  // same objects: update the scores in place
    for (const o of objects) {
      const score = document.querySelector(`#objects li[data-obj-id="${o.obj_id}"] .score`);
      if (score) score.textContent = o.score.toFixed(2);
    }
    return;
  }
  objectsKey = key;
  const list = $("objects");
  list.replaceChildren(...objects.map((o) => {
    const item = document.createElement("li");
    item.dataset.objId = o.obj_id;
    item.classList.toggle("selected", o.obj_id === selected);
    item.innerHTML = `<span class="swatch"></span><span class="name"></span><span class="score"></span>` +
      `<button type="button" title="remove this object">✕</button>`;
    item.querySelector(".swatch").style.background = o.color || "#888";
    item.querySelector(".name").textContent = `#${o.obj_id}${o.label ? " " + o.label : ""}`;
    item.querySelector(".score").textContent = o.score.toFixed(2);
    item.querySelector("button").onclick = (event) => {
      event.stopPropagation();
      send({ op: "remove_object", obj_id: o.obj_id });
      if (selected === o.obj_id) selected = null;
    };
    item.onclick = () => {
      selected = selected === o.obj_id ? null : o.obj_id;
      renderObjects(frame ? frame.objects : objects);
    };
    return item;
  }));
}

// Chips for the text prompts in effect: added here, or labels on the current frame's objects.
function renderConcepts() {
  const labels = new Set(concepts);
  if (frame) frame.objects.forEach((o) => o.label && labels.add(o.label));
  const key = [...labels].sort().join("|");
  if (key === conceptsKey) return;
  conceptsKey = key;
  $("concepts").replaceChildren(...[...labels].sort().map((text) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = text;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.title = "stop tracking this concept";
    remove.textContent = "✕";
    remove.onclick = () => send({ op: "remove_prompt", text }, () => { concepts.delete(text); renderConcepts(); });
    chip.append(remove);
    return chip;
  }));
}

// ---- prompts to the gateway -------------------------------------------------------------------

function send(message, onAccepted = null) {
  if (!channel || channel.readyState !== "open") {
    note("not connected: prompt not sent", true);
    return;
  }
  message.id = `r${++requestCount}`;
  if (onAccepted) pending.set(message.id, onAccepted);
  channel.send(JSON.stringify(message));
}

function addPrompt(prompt, onAccepted = null) {
  // The frame on screen: its objects message arrives with its picture, so the newest one is what the
  // operator sees. Its seq lets the tracker place clicks and boxes on that very frame (the prompt ring).
  if (frame) Object.assign(prompt, { seq: frame.seq, frame_index: frame.frame_index });
  send({ op: "add_prompt", prompt }, onAccepted);
}

// Where the event falls in the frame, in [0, 1] x [0, 1], through object-fit: contain's letterbox;
// null outside the picture.
function toFrame(event, clamp = false) {
  const rect = video.getBoundingClientRect();
  if (!video.videoWidth || !video.videoHeight) return null;
  const scale = Math.min(rect.width / video.videoWidth, rect.height / video.videoHeight);
  const left = rect.left + (rect.width - video.videoWidth * scale) / 2;
  const top = rect.top + (rect.height - video.videoHeight * scale) / 2;
  const u = (event.clientX - left) / (video.videoWidth * scale);
  const v = (event.clientY - top) / (video.videoHeight * scale);
  if (clamp) return { u: Math.min(Math.max(u, 0), 1), v: Math.min(Math.max(v, 0), 1) };
  return u >= 0 && u < 1 && v >= 0 && v < 1 ? { u, v } : null;
}

// Pixel size of the frames the tracker sees (the encoder may deliver them at another size).
function frameSize() {
  return frame ? [frame.width, frame.height] : [video.videoWidth, video.videoHeight];
}

let drag = null;

video.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  const at = toFrame(event);
  if (!at) return;
  drag = { x: event.clientX, y: event.clientY, at, shift: event.shiftKey, moved: false };
  video.setPointerCapture(event.pointerId);
});

video.addEventListener("pointermove", (event) => {
  if (!drag) return;
  drag.moved ||= Math.hypot(event.clientX - drag.x, event.clientY - drag.y) >= DRAG_MIN_PX;
  if (!drag.moved) return;
  const stage = $("stage").getBoundingClientRect();
  const box = $("dragbox");
  Object.assign(box.style, {
    left: `${Math.min(drag.x, event.clientX) - stage.left}px`,
    top: `${Math.min(drag.y, event.clientY) - stage.top}px`,
    width: `${Math.abs(event.clientX - drag.x)}px`,
    height: `${Math.abs(event.clientY - drag.y)}px`,
  });
  box.hidden = false;
});

video.addEventListener("pointerup", (event) => {
  if (!drag) return;
  const start = drag;
  drag = null;
  $("dragbox").hidden = true;
  const target = selected !== null ? { obj_id: selected } : {};
  if (!start.moved) {
    const [width, height] = frameSize();
    const x = Math.round(start.at.u * width * 10) / 10;
    const y = Math.round(start.at.v * height * 10) / 10;
    addPrompt({ points: [[x, y]], point_labels: [start.shift ? 0 : 1], ...target });
    return;
  }
  const end = toFrame(event, true);
  const [u0, u1] = [Math.min(start.at.u, end.u), Math.max(start.at.u, end.u)];
  const [v0, v1] = [Math.min(start.at.v, end.v), Math.max(start.at.v, end.v)];
  if (u1 - u0 <= 0 || v1 - v0 <= 0) return;
  addPrompt({ bounding_boxes: [[(u0 + u1) / 2, (v0 + v1) / 2, u1 - u0, v1 - v0]], bounding_box_labels: [1], ...target });
});

$("concept").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (text) addPrompt({ text }, () => { concepts.add(text); renderConcepts(); $("text").value = ""; });
});

$("reset").addEventListener("click", () => {
  selected = null;
  send({ op: "reset_session" }, () => { concepts.clear(); renderConcepts(); });
});

// ---- page bits --------------------------------------------------------------------------------

function setBadge(id, value) {
  const badge = $(id);
  badge.textContent = value.replace("_", " ");
  badge.className = `badge ${value}`;
}

function note(text, isError = false) {
  const list = $("answers");
  const item = document.createElement("li");
  item.textContent = text;
  if (isError) item.className = "error";
  list.prepend(item);
  while (list.children.length > 20) list.lastChild.remove();
}

connect();
