// The demo page: tickets from /dev/ticket, everything shown with textContent.
import { connect, SESSION_EXPIRED } from "/static/securepub.js";

const MAX_ITEMS = 200;
const $ = (id) => document.getElementById(id);

function prepend(list, item) {
  list.prepend(item);
  while (list.children.length > MAX_ITEMS) list.lastElementChild.remove();
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function logEvent(text, isError = false) {
  const time = new Date().toLocaleTimeString();
  prepend($("events"), element("li", isError ? "error" : "", time + "  " + text));
}

// HH:MM:SS, local time, of epoch seconds.
function clockTime(seconds) {
  const date = new Date(seconds * 1000);
  return [date.getHours(), date.getMinutes(), date.getSeconds()]
    .map((n) => String(n).padStart(2, "0"))
    .join(":");
}

// A ticket for this page, bound to its address; POST + Origin, so other sites cannot mint one.
// Called for every connection and for every refresh of the session. A refusal carries the
// endpoint's Retry-After (seconds), so securepub.js waits at least that long.
async function getTicket() {
  const response = await fetch("/dev/ticket", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: "{}",
    cache: "no-store",
    credentials: "same-origin",
  });
  if (!response.ok) {
    const error = new Error("/dev/ticket answered " + response.status);
    const retryAfter = (response.headers.get("Retry-After") || "").trim();
    if (/^[0-9]{1,9}$/.test(retryAfter)) error.retryAfter = Number(retryAfter);
    throw error;
  }
  return response.json();
}

// "session until HH:MM:SS": when the session ends unless refreshed (it is, automatically).
function showExpiry(expiresAt) {
  const label = $("expiry");
  if (typeof expiresAt === "number") {
    label.textContent = "session until " + clockTime(expiresAt);
    label.dataset.expiresAt = String(expiresAt);
  } else {
    label.textContent = "";
    delete label.dataset.expiresAt;
  }
}

function showMessage(message) {
  const item = element("li", "message");
  item.dataset.topic = String(message.topic);
  item.dataset.id = String(message.id);
  const time = typeof message.ts === "number" ? new Date(message.ts * 1000).toLocaleTimeString() : "";
  item.append(element("span", "topic", String(message.topic)));
  if (message.offset !== undefined) {
    // On a topic with history: its place in the topic's order.
    item.dataset.offset = String(message.offset);
    item.dataset.epoch = String(message.epoch);
    item.append(element("span", "offset", "#" + String(message.offset)));
  }
  item.append(element("span", "time", time), element("span", "data", JSON.stringify(message.data)));
  prepend($("messages"), item);
}

function byTopic(listId, topic) {
  return document.querySelector("#" + listId + ' li[data-topic="' + CSS.escape(topic) + '"]');
}

// Where each topic with history stands: "live" once subscribed, then after each
// resubscription that resumed from the last offset seen, whether the missed
// messages were sent ("recovered") or lost ("must refetch").
function showStatus(topic, status, offset) {
  let item = byTopic("recovery", topic);
  if (!item) {
    item = element("li");
    item.dataset.topic = topic;
    $("recovery").append(item);
  }
  item.dataset.status = status;
  item.className = status === "must refetch" ? "error" : "";
  item.textContent = topic + ": " + status + (offset === undefined ? "" : " (at offset " + offset + ")");
}

function showRecovery(topic, { recovered, offset }) {
  showStatus(topic, recovered ? "recovered" : "must refetch", offset);
  logEvent(
    recovered
      ? "resumed " + topic + ": every missed message is sent again"
      : "resumed " + topic + ": messages were lost, the application must refetch its state",
    !recovered,
  );
}

// -- presence: who is on a topic whose rule has presence = true

// Topics whose users are shown, kept up to date as users join and leave.
const shownPresence = new Set();

function showPresence(topic, users) {
  let item = byTopic("presence", topic);
  if (!item) {
    item = element("li");
    item.dataset.topic = topic;
    $("presence").append(item);
  }
  const names = Object.keys(users).sort();
  const list = element("ul", "users");
  for (const user of names) {
    const entry = element("li", "user", user + (users[user] > 1 ? " (" + users[user] + " sessions)" : ""));
    entry.dataset.user = user;
    entry.dataset.sessions = String(users[user]);
    list.append(entry);
  }
  item.replaceChildren(element("code", "", topic), element("span", "count", ": " + names.length + " present"), list);
  item.dataset.users = names.join(" ");
  shownPresence.add(topic);
}

function askPresence(topic) {
  client.presence(topic).then(
    (users) => {
      showPresence(topic, users);
      $("presence-result").textContent = "";
      $("presence-result").className = "";
    },
    (error) => {
      $("presence-result").textContent = "presence of " + topic + ": " + error.code + ": " + error.message;
      $("presence-result").className = "error";
    },
  );
}

function presenceChanged(topic, user, verb) {
  logEvent(user + " " + verb + " " + topic);
  // A join or leave says the topic tracks presence: show (or refresh) who is there.
  askPresence(topic);
}

function forgetTopic(topic) {
  shownPresence.delete(topic);
  for (const listId of ["subscriptions", "recovery", "presence"]) {
    const item = byTopic(listId, topic);
    if (item) item.remove();
  }
}

function addSubscription(topic) {
  const item = element("li", "subscription");
  item.dataset.topic = topic;
  item.append(element("code", "", topic), " ");
  const button = element("button", "", "Unsubscribe");
  button.type = "button";
  button.addEventListener("click", () => {
    client.unsubscribe(topic).then(
      () => logEvent("unsubscribed from " + topic),
      (error) => logEvent("unsubscribe " + topic + ": " + error.code + ": " + error.message, true),
    );
    forgetTopic(topic);
  });
  item.append(button);
  $("subscriptions").append(item);
}

const client = connect({
  getTicket,
  onMessage: showMessage,
  onRecover: showRecovery,
  onUnsubscribed: (topic, reason) => {
    logEvent("the server ended the subscription to " + topic + " (" + reason + ")", true);
    forgetTopic(topic);
  },
  onError: (error) => logEvent(error.code + ": " + error.message, true),
  onRefresh: ({ expiresAt }) => {
    showExpiry(expiresAt);
    logEvent("session refreshed" + (typeof expiresAt === "number" ? " until " + clockTime(expiresAt) : ""));
  },
  onJoin: (topic, user) => presenceChanged(topic, user, "joined"),
  onLeave: (topic, user) => presenceChanged(topic, user, "left"),
  onStateChange: (state, detail) => {
    const label = $("state");
    label.textContent = state;
    label.dataset.state = state;
    $("session").textContent = state === "open" ? "as " + detail.user + " (session " + detail.session + ")" : "";
    document.body.dataset.state = state;
    // Called once before connect() returns (state "connecting"): `client` exists from "open" on.
    showExpiry(state === "open" ? client.expiresAt : null);
    if (state === "reconnecting") {
      const why = detail.code === SESSION_EXPIRED ? " (the session expired)" : "";
      logEvent("reconnecting in " + detail.delay + " ms" + why);
    } else logEvent(state);
    if (state === "open") for (const topic of shownPresence) askPresence(topic);
  },
});
window.securepubDemo = client; // for the console and for tests

function subscribe(topic) {
  if (!byTopic("subscriptions", topic)) addSubscription(topic);
  client.subscribe(topic).then(
    ({ offset }) => {
      logEvent("subscribed to " + topic + (offset === undefined ? "" : " at offset " + offset));
      if (offset !== undefined && !byTopic("recovery", topic)) showStatus(topic, "live", offset);
    },
    (error) => {
      logEvent("subscribe " + topic + ": " + error.code + ": " + error.message, true);
      forgetTopic(topic);
    },
  );
}

$("subscribe-form").addEventListener("submit", (e) => {
  e.preventDefault();
  subscribe($("subscribe-topic").value.trim());
});

$("presence-form").addEventListener("submit", (e) => {
  e.preventDefault();
  askPresence($("presence-topic").value.trim());
});

$("publish-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const result = $("publish-result");
  let data;
  try {
    data = JSON.parse($("publish-data").value);
  } catch (error) {
    result.textContent = "not JSON: " + error.message;
    result.className = "error";
    return;
  }
  const topic = $("publish-topic").value.trim();
  client.publish(topic, data).then(
    () => {
      result.textContent = "published to " + topic;
      result.className = "";
    },
    (error) => {
      result.textContent = error.code + ": " + error.message;
      result.className = "error";
    },
  );
});

subscribe($("subscribe-topic").value.trim());
