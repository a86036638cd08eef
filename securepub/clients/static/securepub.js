// securepub.js: the browser client of a securepub server. A plain ES module, no build step.
//
//   import { connect } from "https://pubsub.example.com/static/securepub.js";
//   const client = connect({
//     getTicket: async () => (await fetch("/my-app/securepub-ticket", {method: "POST"})).json(),
//     onMessage: (message) => { element.textContent = JSON.stringify(message.data); },
//   });
//   await client.subscribe("news.*");
//   await client.publish("chat.room1", {text: "hi"});
//
// Every frame is parsed with JSON.parse and handed over as data; nothing
// here turns server data into markup or code. Render it with textContent.

export const SUBPROTOCOL = "securepub.v1";

// Close codes after which reconnecting cannot help: the client must be fixed.
export const FATAL_CLOSE_CODES = Object.freeze([1003, 1007, 1008, 1009]);

const TICKET_SHAPE = /^[A-Za-z0-9_-]{1,512}$/;

/** An `error` reply, a refused connection or a ticket that could not be had. */
export class SecurePubError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "SecurePubError";
    this.code = code;
  }
}

// The WebSocket URL of the server this module was loaded from.
function defaultUrl() {
  const url = new URL("/ws", import.meta.url);
  url.protocol = "wss:";
  return url.href;
}

function checkUrl(url) {
  const parsed = new URL(url);
  if (parsed.protocol !== "wss:") {
    throw new SecurePubError("bad_request", "securepub speaks wss:// only, not " + parsed.protocol);
  }
  return parsed.href;
}

// The ticket from whatever getTicket() gave: a string, or {"ticket": ...} as /v1/tickets answers.
function ticketOf(value) {
  const ticket = typeof value === "string" ? value : value && value.ticket;
  if (typeof ticket !== "string" || !TICKET_SHAPE.test(ticket)) {
    throw new SecurePubError("bad_ticket", "getTicket() gave no ticket");
  }
  return ticket;
}

/**
 * Connect to a securepub server, and stay connected.
 *
 * options.url            wss://HOST:PORT/ws (default: the server that served this module)
 * options.getTicket      () => Promise of a ticket string or {ticket}; called for every
 *                        connection, since a ticket is used once
 * options.onMessage      (message) => void, message = {topic, id, ts, data}
 * options.onError        (error) => void, a SecurePubError
 * options.onStateChange  (state, detail) => void; state is "connecting", "open",
 *                        "reconnecting" (detail.delay in ms) or "closed"
 * options.initialDelay, options.maxDelay   backoff bounds in ms (default 500, 30000)
 *
 * Returns a client with subscribe(topic), unsubscribe(topic) and publish(topic, data),
 * each returning a Promise resolved by the server's "ok" and rejected by its "error"
 * (a SecurePubError with .code), and close().
 */
export function connect(options = {}) {
  const url = checkUrl(options.url || defaultUrl());
  const getTicket = options.getTicket;
  if (typeof getTicket !== "function") {
    throw new TypeError("connect() needs a getTicket function");
  }
  const noop = () => {};
  const onMessage = options.onMessage || noop;
  const onError = options.onError || noop;
  const onStateChange = options.onStateChange || noop;
  const initialDelay = options.initialDelay ?? 500;
  const maxDelay = options.maxDelay ?? 30000;

  const topics = new Set(); // what the application wants subscribed, across reconnects
  const waiting = new Map(); // topic -> [{resolve, reject}] until it is subscribed
  const pending = new Map(); // request id -> {resolve, reject, op, topic}
  let socket = null;
  let state = "closed";
  let nextId = 0;
  let attempt = 0;
  let timer = null;
  let closedByUser = false;
  let session = null;

  function report(error) {
    try {
      onError(error);
    } catch (e) {
      console.error(e);
    }
  }

  function setState(next, detail = {}) {
    state = next;
    try {
      onStateChange(next, detail);
    } catch (e) {
      console.error(e);
    }
  }

  function send(frame) {
    socket.send(JSON.stringify(frame));
  }

  function request(frame) {
    const id = ++nextId;
    return new Promise((resolve, reject) => {
      pending.set(id, { resolve, reject, op: frame.op, topic: frame.topic });
      send({ ...frame, id });
    });
  }

  function settleWaiting(topic, error) {
    const list = waiting.get(topic) || [];
    waiting.delete(topic);
    for (const { resolve, reject } of list) {
      if (error) reject(error);
      else resolve();
    }
  }

  function sendSubscribe(topic) {
    request({ op: "subscribe", topic }).then(
      () => settleWaiting(topic, null),
      (error) => {
        // Lost with the connection: it is sent again once reconnected.
        if (error.code === "connection_lost") return;
        // Refused (forbidden, invalid_topic, ...): do not ask again after a reconnect.
        topics.delete(topic);
        settleWaiting(topic, error);
        report(error);
      },
    );
  }

  // A lost connection: an unsubscribe is done (nothing is subscribed any more),
  // a subscribe is sent again after the reconnect, a publish may or may not have happened.
  function failPending() {
    const lost = new SecurePubError(
      "connection_lost",
      "the connection was lost before the server answered; a publish may or may not have happened",
    );
    for (const { resolve, reject, op } of pending.values()) {
      if (op === "unsubscribe") resolve();
      else reject(lost);
    }
    pending.clear();
  }

  function describe(error) {
    if (error instanceof SecurePubError) return error;
    const text = error && error.message ? error.message : String(error);
    return new SecurePubError("no_ticket", "getTicket() failed: " + text);
  }

  async function open() {
    timer = null;
    if (closedByUser) return;
    setState("connecting", { attempt });
    let ticket;
    try {
      ticket = ticketOf(await getTicket());
    } catch (e) {
      report(describe(e));
      scheduleReconnect();
      return;
    }
    if (closedByUser) {
      setState("closed", {});
      return;
    }
    let ws;
    try {
      ws = new WebSocket(url, [SUBPROTOCOL, "ticket." + ticket]);
    } catch (e) {
      report(new SecurePubError("bad_request", "cannot open a WebSocket to " + url));
      setState("closed", {});
      return;
    }
    socket = ws;
    ws.onmessage = (event) => {
      if (ws === socket) frame(event.data);
    };
    ws.onclose = (event) => {
      if (ws === socket) closed(event.code, event.reason);
    };
  }

  function frame(text) {
    if (typeof text !== "string") return; // the server sends text frames only
    let message;
    try {
      message = JSON.parse(text);
    } catch (e) {
      report(new SecurePubError("bad_frame", "a frame from the server is not JSON"));
      return;
    }
    if (message === null || typeof message !== "object" || Array.isArray(message)) return;
    switch (message.op) {
      case "welcome":
        if (socket.protocol !== SUBPROTOCOL) {
          report(new SecurePubError("bad_frame", "the server did not accept " + SUBPROTOCOL));
          socket.close(1000);
          return;
        }
        session = { session: message.session, user: message.user };
        attempt = 0;
        setState("open", session);
        for (const topic of topics) sendSubscribe(topic);
        break;
      case "message":
        try {
          onMessage({ topic: message.topic, id: message.id, ts: message.ts, data: message.data });
        } catch (e) {
          console.error(e);
        }
        break;
      case "ok":
      case "error": {
        const entry = pending.get(message.id);
        if (entry === undefined) {
          if (message.op === "error") {
            report(new SecurePubError(String(message.code), String(message.message)));
          }
          return;
        }
        pending.delete(message.id);
        if (message.op === "ok") entry.resolve();
        else entry.reject(new SecurePubError(String(message.code), String(message.message)));
        break;
      }
      default:
        break;
    }
  }

  function closed(code, reason) {
    socket = null;
    session = null;
    failPending();
    if (closedByUser) {
      setState("closed", { code });
      return;
    }
    if (FATAL_CLOSE_CODES.includes(code)) {
      report(new SecurePubError("closed", "the server closed the connection (" + code + " " + reason + ")"));
      for (const topic of [...waiting.keys()]) {
        settleWaiting(topic, new SecurePubError("closed", "the connection is closed"));
      }
      setState("closed", { code });
      return;
    }
    scheduleReconnect(code);
  }

  // Exponential backoff with jitter: a random delay between half and all of
  // min(maxDelay, initialDelay * 2^attempt), so many pages do not return in step.
  function scheduleReconnect(code) {
    if (closedByUser) {
      setState("closed", {});
      return;
    }
    const ceiling = Math.min(maxDelay, initialDelay * 2 ** Math.min(attempt, 20));
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    attempt += 1;
    setState("reconnecting", { delay, code });
    timer = setTimeout(open, delay);
  }

  const client = {
    /** The current state: "connecting", "open", "reconnecting" or "closed". */
    get state() {
      return state;
    },

    /** {session, user} from the server's welcome while open, else null. */
    get session() {
      return session;
    },

    /** Subscribe now and after every reconnect; resolves once the server said ok. */
    subscribe(topic) {
      if (closedByUser) return Promise.reject(new SecurePubError("closed", "the client is closed"));
      if (typeof topic !== "string") return Promise.reject(new TypeError("a topic is a string"));
      const already = topics.has(topic) && !waiting.has(topic);
      topics.add(topic);
      if (already && state === "open") return request({ op: "subscribe", topic });
      const promise = new Promise((resolve, reject) => {
        const list = waiting.get(topic) || [];
        list.push({ resolve, reject });
        waiting.set(topic, list);
      });
      if (state === "open" && waiting.get(topic).length === 1) sendSubscribe(topic);
      return promise;
    },

    /** Stop receiving a topic, now and after reconnects. */
    unsubscribe(topic) {
      topics.delete(topic);
      settleWaiting(topic, new SecurePubError("unsubscribed", "unsubscribed before it was subscribed"));
      if (state !== "open") return Promise.resolve();
      return request({ op: "unsubscribe", topic });
    },

    /** Publish while open; resolves on ok, rejects on error or if the connection is lost. */
    publish(topic, data) {
      if (closedByUser) return Promise.reject(new SecurePubError("closed", "the client is closed"));
      if (state !== "open") {
        return Promise.reject(new SecurePubError("not_connected", "not connected; try again when open"));
      }
      return request({ op: "publish", topic, data });
    },

    /** Close for good: no more reconnects; what is still pending is rejected. */
    close() {
      if (closedByUser) return;
      closedByUser = true;
      if (timer !== null) clearTimeout(timer);
      timer = null;
      for (const topic of [...waiting.keys()]) {
        settleWaiting(topic, new SecurePubError("closed", "the client is closed"));
      }
      const ws = socket;
      socket = null;
      session = null;
      failPending();
      if (ws !== null) ws.close(1000);
      setState("closed", {});
    },
  };

  open();
  return client;
}
