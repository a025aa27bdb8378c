// sam3-stream operator page: live composited video over WebRTC, prompts over the "prompts" data channel.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video");
const DRAG_MIN_PX = 6;

let pc = null;
let channel = null;
let viewChannel = null;  // "exact" or "smooth": which video this page watches
let frame = null;          // the newest "objects" message: frame size, index and objects
let selected = null;       // obj_id that clicks refine; null makes a new object
let objectsKey = "";
let conceptsKey = "";
const concepts = new Set();  // concepts accepted from this page (the tracker's own show up as labels)
const pending = new Map();   // request id -> the prompt, until the results show its effect (or it is refused)
const names = new Map();     // obj_id -> the name the operator gave a click or box object
let requestCount = 0;
let retryDelay = 1000;
let reconnectTimer = null;

// Logged in by /?token=: the session cookie is set, so the token leaves the address bar (and history).
if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);

// ---- connection -------------------------------------------------------------------------------

async function connect() {
  clearTimeout(reconnectTimer);
  if (pc) pc.close();
  pending.clear();  // a closed connection's prompts are answered no more
  setBadge("connection", "connecting");
  pc = new RTCPeerConnection({ iceServers: [] });
  const myPc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  channel = pc.createDataChannel("prompts");
  viewChannel = pc.createDataChannel("view");
  viewChannel.onopen = () => viewChannel.send($("view").value);
  viewChannel.onmessage = (event) => {
    const answer = JSON.parse(event.data);
    $("view").value = answer.view;
    if (!answer.ok) note(`Video view refused: ${answer.error}`, true);
  };
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
  for (const id of ["state", "fps", "camera-fps", "latency", "stream", "source", "model"]) $(id).textContent = "–";
  $("state").className = "badge";
  $("detail").textContent = "";
  $("held").hidden = true;
  frame = null;
  pending.clear();
  render();
  highlight();
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
//
// What the lists show comes from the tracker's results: an answer only says a prompt was accepted (it is
// applied on a later frame, seconds later with a slow model). Until the results show its effect, a prompt
// is "pending" (drawn as such); a refusal, or a failure when applied, ends it with the tracker's reason.

function onMessage(message) {
  if (message.type === "objects") {
    frame = message;
    $("fps").textContent = rate(message.fps);
    $("camera-fps").textContent = message.camera_fps ? rate(message.camera_fps) : "–";
    $("latency").textContent = `${Math.round(message.latency_ms)} ms`;
    // Smooth view: the masks drawn were computed on an earlier frame than the one shown.
    $("held").hidden = !message.held;
    if (message.held) $("held").textContent = `masks held from ${message.seq - message.masks_seq} frames earlier`;
    settle();
    render();
    highlight();
  } else if (message.type === "status") {
    setBadge("state", message.state);
    $("state").title = $("detail").textContent = message.detail || "";
    for (const key of ["stream", "source", "model"]) $(key).textContent = message[key] || "–";
    const smooth = $("view").querySelector('option[value="smooth"]');
    smooth.disabled = !(message.views || []).includes("smooth");
    smooth.title = smooth.disabled ? "this gateway does not read the camera (serve --frames-endpoint)" : "";
    if (!["live", "slow"].includes(message.state)) { frame = null; render(); highlight(); }
  } else if (message.type === "answer") {
    onAnswer(message);
  } else if (message.type === "event") {
    onEvent(message);
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

function onAnswer(answer) {
  const op = pending.get(answer.id);
  if (!op) return note(answer.ok ? "Done." : `Refused: ${answer.error}`, !answer.ok);
  if (!answer.ok) {
    pending.delete(answer.id);
    note(`${op.what}: refused — ${answer.error}`, true);
  } else {
    Object.assign(op, { accepted: true, objIds: answer.obj_ids || [], frameIndex: answer.frame_index });
    if (op.op === "add_prompt" && op.prompt.text !== undefined) concepts.add(op.prompt.text);
    const ids = op.objIds.map((id) => `#${id}`).join(", ");
    note(`${op.what}: accepted${ids ? ` (${op.objIds.length > 1 ? "objects" : "object"} ${ids})` : ""}` +
      `${placement(answer)}; waiting for the tracker to apply it`);
  }
  settle();
  render();
}

function onEvent(event) {
  const op = event.id !== null && event.id !== undefined ? pending.get(event.id) : null;
  if (event.event === "prompt_failed") {
    if (op) pending.delete(event.id);
    note(`${op ? op.what : "A prompt"} could not be applied: ${event.message}`, true);
    render();
  } else if (event.event === "objects_reacquired") {
    note(`The tracker restarted and re-applied the prompts: ${event.message}`);
  } else if (event.event === "objects_capped") {
    note(`Too many objects: ${event.message}`, true);
  } else {
    note(`${event.event.replaceAll("_", " ")}: ${event.message}`);
  }
}

// Whether the newest result shows an accepted prompt's effect; confirmed ones leave the pending set.
function settle() {
  if (!frame) return;
  const shown = new Set(frame.objects.map((o) => o.obj_id));
  const labels = new Set(frame.objects.map((o) => o.label).filter(Boolean));
  const reached = (op) => op.frameIndex === null || op.frameIndex === undefined || frame.frame_index >= op.frameIndex;
  for (const [id, op] of pending) {
    if (!op.accepted || !reached(op)) continue;
    let done;
    if (op.op === "remove_object") done = !shown.has(op.obj_id);
    else if (op.op === "remove_prompt") done = !labels.has(op.text);
    else if (op.op === "reset_session") done = frame.objects.length === 0;
    else done = true;  // an add is applied by the frame it names: what the result shows is the truth
    if (!done) continue;
    const missing = op.op === "add_prompt" ? op.objIds.filter((objId) => !shown.has(objId)) : [];
    pending.delete(id);
    if (op.op === "remove_prompt") concepts.delete(op.text);
    if (op.op === "reset_session") { concepts.clear(); names.clear(); }
    if (op.op === "remove_object") names.delete(op.obj_id);
    note(missing.length ? `${op.what}: applied, but frame ${frame.frame_index} shows no object ` +
      `${missing.map((objId) => `#${objId}`).join(", ")}` : `${op.what}: done`, missing.length > 0);
  }
}

function pendingFor(predicate) {
  for (const op of pending.values()) if (op.accepted !== false && predicate(op)) return op;
  return null;
}

function render() {
  renderObjects(frame ? frame.objects : []);
  renderConcepts();
}

// The objects of the newest result, each marked while a remove or reset of it is on its way; objects an
// accepted click or box will create are listed as pending until a result shows them.
function renderObjects(objects) {
  const resetting = pendingFor((op) => op.op === "reset_session");
  const rows = objects.map((o) => {
    const removing = resetting || pendingFor((op) => op.op === "remove_object" && op.obj_id === o.obj_id) ||
      (o.label && pendingFor((op) => op.op === "remove_prompt" && op.text === o.label));
    return { ...o, pending: removing ? "removing" : null };
  });
  const shown = new Set(objects.map((o) => o.obj_id));
  for (const op of pending.values()) {
    if (!op.accepted || op.op !== "add_prompt") continue;
    for (const objId of op.objIds) {
      if (!shown.has(objId)) rows.push({ obj_id: objId, score: null, label: null, color: null, pending: "adding" });
    }
  }
  const key = rows.map((o) => `${o.obj_id}:${o.label}:${o.pending}:${names.get(o.obj_id) || ""}`).join("|") + `#${selected}`;
  if (key === objectsKey) {  // same objects: update the scores in place
    for (const o of rows) {
      const score = document.querySelector(`#objects li[data-obj-id="${o.obj_id}"] .score`);
      if (score && o.score !== null) score.textContent = o.score.toFixed(2);
    }
    return;
  }
  objectsKey = key;
  $("objects").replaceChildren(...rows.map(objectRow));
}

function objectRow(o) {
  const item = document.createElement("li");
  item.dataset.objId = o.obj_id;
  item.classList.toggle("selected", o.obj_id === selected);
  if (o.pending) item.classList.add("pending", o.pending);
  item.title = o.pending === "adding" ? "accepted: waiting for the tracker to show it" :
    o.pending === "removing" ? "removal accepted: waiting for the tracker to apply it" : "";
  item.innerHTML = `<span class="swatch"></span><span class="id"></span><span class="name"></span>` +
    `<span class="score"></span><button type="button" title="remove this object">✕</button>`;
  item.querySelector(".swatch").style.background = o.color || "#888";
  item.querySelector(".id").textContent = `#${o.obj_id}`;
  const name = item.querySelector(".name");
  name.textContent = o.label || names.get(o.obj_id) || "";
  if (!o.label) {  // a click or box object: the operator names it (double-click)
    name.classList.add("editable");
    name.title = "double-click to name this object";
    name.ondblclick = (event) => { event.stopPropagation(); editName(name, o.obj_id); };
  }
  item.querySelector(".score").textContent = o.pending ? `${o.pending}…` : o.score.toFixed(2);
  const remove = item.querySelector("button");
  remove.disabled = o.pending === "removing";
  remove.onclick = (event) => {
    event.stopPropagation();
    send({ op: "remove_object", obj_id: o.obj_id }, `Remove object #${o.obj_id}`);
    if (selected === o.obj_id) selected = null;
    render();
  };
  item.onclick = () => {
    selected = selected === o.obj_id ? null : o.obj_id;
    render();
    highlight();
  };
  return item;
}

function editName(element, objId) {
  const input = Object.assign(document.createElement("input"), {
    type: "text", value: names.get(objId) || "", maxLength: 60, className: "rename",
  });
  const done = (keep) => {
    if (keep) {
      const text = input.value.trim();
      if (text) names.set(objId, text); else names.delete(objId);
    }
    objectsKey = "";
    render();
  };
  input.onkeydown = (event) => {
    if (event.key === "Enter") done(true);
    if (event.key === "Escape") done(false);
  };
  input.onblur = () => done(true);
  input.onclick = (event) => event.stopPropagation();
  element.replaceChildren(input);
  input.focus();
}

// Chips for the concepts: the labels on the newest result's objects, and concepts accepted that have not
// found anything yet (pending); a chip being removed stays, marked, until the results drop its objects.
function renderConcepts() {
  const found = new Set(frame ? frame.objects.map((o) => o.label).filter(Boolean) : []);
  const all = new Set([...found, ...concepts]);
  const chips = [...all].sort().map((text) => ({
    text,
    state: pendingFor((op) => (op.op === "remove_prompt" && op.text === text) || op.op === "reset_session")
      ? "removing" : found.has(text) ? "found" : "searching",
  }));
  const key = chips.map((c) => `${c.text}:${c.state}`).join("|");
  if (key === conceptsKey) return;
  conceptsKey = key;
  $("concepts").replaceChildren(...chips.map(({ text, state }) => {
    const chip = document.createElement("span");
    chip.className = `chip ${state}`;
    chip.dataset.text = text;
    chip.title = state === "found" ? text : state === "searching" ? `${text}: accepted, nothing found yet` :
      `${text}: removal accepted, waiting for the tracker`;
    const label = Object.assign(document.createElement("span"), { className: "text", textContent: text });
    const remove = Object.assign(document.createElement("button"), {
      type: "button", title: "stop tracking this concept", textContent: "✕", disabled: state === "removing",
    });
    remove.onclick = () => {
      send({ op: "remove_prompt", text }, `Stop tracking “${text}”`);
      render();
    };
    chip.append(label, remove);
    return chip;
  }));
}

// The selected object's box, drawn over the video through object-fit: contain's letterbox.
function highlight() {
  const box = $("highlight");
  const o = frame && selected !== null ? frame.objects.find((obj) => obj.obj_id === selected) : null;
  if (!o || !video.videoWidth) { box.hidden = true; return; }
  const rect = video.getBoundingClientRect();
  const stage = $("stage").getBoundingClientRect();
  const scale = Math.min(rect.width / video.videoWidth, rect.height / video.videoHeight);
  const left = rect.left - stage.left + (rect.width - video.videoWidth * scale) / 2;
  const top = rect.top - stage.top + (rect.height - video.videoHeight * scale) / 2;
  const sx = (video.videoWidth / frame.width) * scale;
  const sy = (video.videoHeight / frame.height) * scale;
  const [x0, y0, x1, y1] = o.bbox;
  Object.assign(box.style, {
    left: `${left + x0 * sx}px`, top: `${top + y0 * sy}px`, width: `${(x1 - x0) * sx}px`, height: `${(y1 - y0) * sy}px`,
    borderColor: o.color || "#fff",
  });
  box.hidden = false;
}

// ---- prompts to the gateway -------------------------------------------------------------------

// Send a prompt; ``what`` says it in the operator's words, for the answers panel and the lists.
function send(message, what) {
  if (!channel || channel.readyState !== "open") {
    note("Not connected: the prompt was not sent", true);
    return;
  }
  message.id = `r${++requestCount}`;
  pending.set(message.id, { ...message, what, accepted: false, objIds: [] });
  channel.send(JSON.stringify(message));
}

function addPrompt(prompt, what) {
  // The frame on screen: its objects message arrives with its picture, so the newest one is what the
  // operator sees. Its seq lets the tracker place clicks and boxes on that very frame (the prompt ring).
  if (frame) Object.assign(prompt, { seq: frame.seq, frame_index: frame.frame_index });
  send({ op: "add_prompt", prompt }, what);
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
    const kind = start.shift ? "Background click" : "Click";
    addPrompt({ points: [[x, y]], point_labels: [start.shift ? 0 : 1], ...target },
      `${kind} ${target.obj_id !== undefined ? `on object #${target.obj_id}` : "for a new object"}`);
    return;
  }
  const end = toFrame(event, true);
  const [u0, u1] = [Math.min(start.at.u, end.u), Math.max(start.at.u, end.u)];
  const [v0, v1] = [Math.min(start.at.v, end.v), Math.max(start.at.v, end.v)];
  if (u1 - u0 <= 0 || v1 - v0 <= 0) return;
  addPrompt({ bounding_boxes: [[(u0 + u1) / 2, (v0 + v1) / 2, u1 - u0, v1 - v0]], bounding_box_labels: [1], ...target },
    `Box ${target.obj_id !== undefined ? `on object #${target.obj_id}` : "for a new object"}`);
});

$("concept").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  addPrompt({ text }, `Track “${text}”`);
  $("text").value = "";
});

$("reset").addEventListener("click", () => {
  selected = null;
  send({ op: "reset_session" }, "Reset (every object and concept)");
  render();
});

$("view").addEventListener("change", () => {
  if (viewChannel && viewChannel.readyState === "open") viewChannel.send($("view").value);
});

// ---- page bits --------------------------------------------------------------------------------

// The feed's states in words (the gateway's detail, shown beside, says why).
const STATE_WORDS = {
  live: "live", slow: "tracker slower than the camera", loading: "loading model", source_failing: "source failing",
  no_signal: "no signal", tracker_offline: "tracker offline",
};

function setBadge(id, value) {
  const badge = $(id);
  badge.textContent = STATE_WORDS[value] || value.replaceAll("_", " ");
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
