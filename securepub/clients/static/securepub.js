// securepub.js: the browser client of a securepub server. A plain ES module, no build step.
//
//   import { connect } from "https://pubsub.example.com/static/securepub.js";
//   const client = connect({
//     getTicket: async () => (await fetch("/my-app/securepub-ticket", {method: "POST"})).json(),
//     onMessage: (message) => { element.textContent = JSON.stringify(message.data); },
//     onRecover: (topic, {recovered}) => { if (!recovered) refetch(topic); },
//   });
//   await client.subscribe("news.*");
//   await client.publish("chat.room1", {text: "hi"});
//   const users = await client.presence("chat.room1");   // {"alice": 2, "bob": 1}
//
// The session lasts until client.expiresAt; when the server says it is
// expiring, getTicket() is called again and the fresh ticket is sent over the
// same connection (a "refresh" frame), so nothing is missed.
//
// Every frame is parsed with JSON.parse and handed over as data; nothing
// here turns server data into markup or code. Render it with textContent.

export const SUBPROTOCOL = "securepub.v1";

// Close codes after which reconnecting cannot help: the client must be fixed.
export const FATAL_CLOSE_CODES = Object.freeze([1003, 1007, 1008, 1009]);

// The close code of a session that reached its expires_at without a refresh:
// reconnecting, with a new ticket, is the cure (SPEC section 9).
export const SESSION_EXPIRED = 4003;

// A retryAfter hint from getTicket() is honoured up to this many seconds (as the Python clients do).
export const MAX_RETRY_AFTER = 60;

// Why the server ends a subscription when it lost track of the topic's order:
// subscribing again `since` the last offset says whether anything was lost.
export const LOST_ORDER = "insufficient_state";

const TICKET_SHAPE = /^[A-Za-z0-9_-]{1,512}$/;

/**
 * An `error` reply, a refused connection or a ticket that could not be had.
 * `retryAfter` (seconds) is set when getTicket() asked to wait that long.
 */
export class SecurePubError extends Error {
  constructor(code, message, retryAfter) {
    super(message);
    this.name = "SecurePubError";
    this.code = code;
    if (retryAfter !== undefined) this.retryAfter = retryAfter;
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

// A topic's position as the server states it: an offset (0, 1, 2, ...) and an epoch.
function isOffset(value) {
  return Number.isSafeInteger(value) && value >= 0;
}

function positionOf(frame) {
  return isOffset(frame.offset) && typeof frame.epoch === "string"
    ? { offset: frame.offset, epoch: frame.epoch }
    : null;
}

// Exponential backoff with jitter: a random delay between half and all of
// min(maxDelay, initialDelay * 2^attempt), so many pages do not return in step.
function backoff(initialDelay, maxDelay, attempt) {
  const ceiling = Math.min(maxDelay, initialDelay * 2 ** Math.min(attempt, 20));
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}

// The seconds a getTicket() failure asked to wait (its `retryAfter`: a number, or a
// string of digits as a Retry-After header holds), capped at MAX_RETRY_AFTER; else undefined.
function retryAfterOf(error) {
  if (error === null || (typeof error !== "object" && typeof error !== "function")) return undefined;
  let value;
  try {
    value = error.retryAfter;
  } catch (e) {
    return undefined;
  }
  if (typeof value === "string" && /^\s*[0-9]{1,9}\s*$/.test(value)) value = Number(value);
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) return undefined;
  return Math.min(value, MAX_RETRY_AFTER);
}

// At least `seconds`, plus jitter (up to a quarter of it and one initialDelay), so the
// pages told to wait do not all come back at the same instant.
function afterRetryAfter(seconds, initialDelay) {
  const wait = seconds * 1000;
  return Math.ceil(wait + Math.random() * (wait / 4 + initialDelay));
}

// The shape of a presence answer: user -> number of sessions.
function usersOf(value) {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return null;
  const entries = Object.entries(value);
  for (const [, count] of entries) if (!isOffset(count)) return null;
  return Object.fromEntries(entries);
}

// At most this many offsets are remembered per topic as already handed over
// ahead of a resume (see `early` below); past it, repeats are no longer filtered.
const MAX_EARLY = 1000;

/**
 * Connect to a securepub server, and stay connected.
 *
 * options.url            wss://HOST:PORT/ws (default: the server that served this module)
 * options.getTicket      () => Promise of a ticket string or {ticket}; called for every
 *                        connection, since a ticket is used once
 * options.onMessage      (message) => void, message = {topic, id, ts, data}, plus
 *                        {offset, epoch} on a topic that keeps history
 * options.onRecover      (topic, {recovered, offset, epoch}) => void: after each
 *                        resubscription that resumed from the last offset seen
 *                        (a reconnect, or the server losing track of the topic), and
 *                        when a message's epoch is not the one seen before
 *                        (recovered false). When recovered is false, messages were
 *                        missed: refetch the topic's state. offset and epoch are the
 *                        topic's position as the server stated it.
 * options.onUnsubscribed (topic, reason) => void: the server ended a subscription for
 *                        good (reason "forbidden": the session's rights no longer
 *                        cover it); it is forgotten, and onError hears of it too
 * options.onError        (error) => void, a SecurePubError
 * options.onStateChange  (state, detail) => void; state is "connecting", "open",
 *                        "reconnecting" (detail.delay in ms, detail.code) or "closed"
 * options.onRefresh      ({expiresAt}) => void: the session was refreshed in-band and
 *                        now lasts until expiresAt (epoch seconds, the server's clock)
 * options.onJoin         (topic, user) => void: a user's first session subscribed to a
 *                        subscribed topic whose rule has join_leave = true
 * options.onLeave        (topic, user) => void: that user's last session left it
 * options.initialDelay, options.maxDelay   backoff bounds in ms (default 500, 30000), for
 *                        reconnecting and for subscribing again after "unavailable"
 *
 * getTicket() may fail (throw or reject) with an object carrying `retryAfter` (seconds,
 * e.g. from the ticket endpoint's Retry-After header): the next try then waits at least
 * that long (capped at MAX_RETRY_AFTER), with jitter.
 *
 * Sessions end (SPEC section 9): on the server's "expiring" notice getTicket() is called
 * again and the ticket sent in a "refresh" frame over the same connection; subscriptions
 * stay. A refresh that fails is reported through onError and tried once more after a
 * short jittered delay if the session has time left; if the session still ends, the
 * server closes with 4003 and the client reconnects (and resumes) as after any loss.
 *
 * Returns a client with subscribe(topic), unsubscribe(topic), publish(topic, data) and
 * presence(topic), each returning a Promise resolved by the server's answer and rejected
 * by its "error" (a SecurePubError with .code), close(), and the state, session and
 * expiresAt properties. subscribe() resolves with {offset, epoch, recovered} (each
 * undefined when the server did not say); presence() with {user: sessions}.
 */
export function connect(options = {}) {
  const url = checkUrl(options.url || defaultUrl());
  const getTicket = options.getTicket;
  if (typeof getTicket !== "function") {
    throw new TypeError("connect() needs a getTicket function");
  }
  const noop = () => {};
  const onMessage = options.onMessage || noop;
  const onRecover = options.onRecover || noop;
  const onUnsubscribed = options.onUnsubscribed || noop;
  const onError = options.onError || noop;
  const onStateChange = options.onStateChange || noop;
  const onRefresh = options.onRefresh || noop;
  const onJoin = options.onJoin || noop;
  const onLeave = options.onLeave || noop;
  const initialDelay = options.initialDelay ?? 500;
  const maxDelay = options.maxDelay ?? 30000;

  // topic or pattern -> its subscription: what the application wants, across reconnects.
  //   position  {offset, epoch} of the last message handed over (or of the subscribe's
  //             ok), on an exact topic that keeps history; else null
  //   state     on the current connection: "idle" (not asked yet), "sending" (asked,
  //             no answer yet), "waiting" (refused as unavailable, asking again at
  //             `retry`), "active" (the server said ok)
  //   waiters   subscribe() promises waiting for the first ok
  //   redo      the server ended it while it was being asked for: ask again on ok
  //   refetch   continuity is lost whatever the next ok says: report recovered false
  //   early     offsets in the position's epoch already handed over while the
  //             subscription was not active (through an overlapping pattern): not
  //             handed over again when a resume sends them
  const subscriptions = new Map();
  const pending = new Map(); // request id -> {ok(frame), fail(error), op}
  let socket = null;
  let state = "closed";
  let nextId = 0;
  let attempt = 0;
  let timer = null;
  let closedByUser = false;
  let session = null;
  // When the current session ends unless refreshed: epoch seconds, or null.
  let expiresAt = null;
  // The refresh under way on the current connection: {ws, tries, timer}, or null.
  let refreshing = null;

  function safely(callback, ...args) {
    try {
      callback(...args);
    } catch (e) {
      console.error(e);
    }
  }

  function report(error) {
    safely(onError, error);
  }

  function setState(next, detail = {}) {
    state = next;
    safely(onStateChange, next, detail);
  }

  function send(frame) {
    socket.send(JSON.stringify(frame));
  }

  function request(frame, ok, fail) {
    const id = ++nextId;
    pending.set(id, { ok, fail, op: frame.op });
    send({ ...frame, id });
  }

  function ask(frame) {
    return new Promise((resolve, reject) => request(frame, () => resolve(), reject));
  }

  function errorOf(frame) {
    return new SecurePubError(String(frame.code), String(frame.message));
  }

  // -- subscriptions

  function newSubscription(topic) {
    return {
      topic,
      position: null,
      state: "idle",
      waiters: [],
      retry: null,
      retries: 0,
      redo: false,
      refetch: false,
      early: null,
    };
  }

  function current(sub) {
    return subscriptions.get(sub.topic) === sub;
  }

  function stopRetry(sub) {
    if (sub.retry !== null) clearTimeout(sub.retry);
    sub.retry = null;
  }

  function settle(sub, error, value) {
    const waiters = sub.waiters;
    sub.waiters = [];
    for (const { resolve, reject } of waiters) {
      if (error) reject(error);
      else resolve(value);
    }
  }

  function forget(sub, error) {
    subscriptions.delete(sub.topic);
    stopRetry(sub);
    sub.state = "idle";
    settle(sub, error);
  }

  // Ask the server; on a topic with a remembered position, resume from it.
  function sendSubscribe(sub) {
    if (state !== "open" || !current(sub)) return;
    stopRetry(sub);
    sub.state = "sending";
    sub.redo = false;
    const since = sub.position;
    const frame = { op: "subscribe", topic: sub.topic };
    if (since !== null) frame.since = { offset: since.offset, epoch: since.epoch };
    request(
      frame,
      (answer) => subscribed(sub, since, answer),
      (error) => refused(sub, since, error),
    );
  }

  function subscribed(sub, since, answer) {
    if (!current(sub)) return; // unsubscribed meanwhile
    if (sub.redo) {
      // The server ended this subscription before it answered: that ok is stale.
      sendSubscribe(sub);
      return;
    }
    sub.state = "active";
    sub.retries = 0;
    const position = positionOf(answer);
    let recovered = typeof answer.recovered === "boolean" ? answer.recovered : undefined;
    if (since !== null && recovered === undefined) recovered = false; // no word on it: assume lost
    if (recovered === true) {
      // The missed messages follow: the position advances as they arrive.
      sub.position = since;
    } else {
      sub.position = position;
      sub.early = null;
    }
    const result = {
      offset: position ? position.offset : undefined,
      epoch: position ? position.epoch : undefined,
      recovered,
    };
    if (since !== null || sub.refetch) {
      sub.refetch = false;
      safely(onRecover, sub.topic, {
        recovered: recovered === true,
        offset: result.offset,
        epoch: result.epoch,
      });
    }
    settle(sub, null, result);
  }

  function refused(sub, since, error) {
    if (!current(sub)) return;
    sub.state = "idle";
    // Lost with the connection: it is sent again once reconnected.
    if (error.code === "connection_lost") return;
    if (error.code === "unavailable") {
      // The cluster engine is down for now: ask again later, with backoff.
      const delay = backoff(initialDelay, maxDelay, sub.retries);
      sub.retries += 1;
      sub.state = "waiting";
      sub.retry = setTimeout(() => {
        sub.retry = null;
        if (sub.state === "waiting") sendSubscribe(sub);
      }, delay);
      const retrying = new SecurePubError(
        "unavailable",
        error.message + " (subscribing to " + sub.topic + " again in " + delay + " ms)",
      );
      report(retrying);
      return;
    }
    if (since !== null && error.code === "bad_request") {
      // The topic keeps no history (any more): subscribe plainly, and say it must be refetched.
      sub.position = null;
      sub.early = null;
      sub.refetch = true;
      sendSubscribe(sub);
      return;
    }
    // Refused (forbidden, invalid_topic, ...): do not ask again after a reconnect.
    forget(sub, error);
    report(error);
  }

  // The server ended a subscription on its own (SPEC sections 8 and 9).
  function ended(topic, reason) {
    if (typeof topic !== "string") return;
    const sub = subscriptions.get(topic);
    if (sub === undefined) return; // the application gave it up already
    const why = typeof reason === "string" && reason ? reason : "unsubscribed";
    if (why === LOST_ORDER) {
      if (sub.position === null) sub.refetch = true; // nothing to resume from
      if (sub.state === "sending") sub.redo = true;
      else if (sub.state === "active") sendSubscribe(sub);
      // "waiting" or "idle": it is asked for again anyway.
      return;
    }
    const error = new SecurePubError(why, "the server ended the subscription to " + topic + " (" + why + ")");
    forget(sub, error);
    report(error);
    safely(onUnsubscribed, topic, why);
  }

  // -- messages

  function delivered(frame) {
    const message = { topic: frame.topic, id: frame.id, ts: frame.ts, data: frame.data };
    if ("offset" in frame) message.offset = frame.offset;
    if ("epoch" in frame) message.epoch = frame.epoch;
    const sub = typeof frame.topic === "string" ? subscriptions.get(frame.topic) : undefined;
    const position = positionOf(frame);
    if (sub !== undefined && position !== null && !track(sub, position)) return;
    safely(onMessage, message);
  }

  // Follow an exact topic's position; false for a message already handed over.
  function track(sub, position) {
    const last = sub.position;
    const sameEpoch = last !== null && last.epoch === position.epoch;
    if (sub.state !== "active") {
      // Through an overlapping pattern while (re)subscribing: a resume may send it again.
      if (sameEpoch && position.offset > last.offset) {
        if (sub.early === null) sub.early = new Set();
        if (sub.early.size < MAX_EARLY) sub.early.add(position.offset);
      }
      return true;
    }
    if (sameEpoch && position.offset <= last.offset) return false; // a repeat
    sub.position = position;
    if (last !== null && !sameEpoch) {
      // The topic's history was lost (server restart, ...) since what was seen last.
      sub.early = null;
      safely(onRecover, sub.topic, { recovered: false, offset: position.offset, epoch: position.epoch });
      return true;
    }
    if (sub.early !== null && sub.early.delete(position.offset)) {
      if (sub.early.size === 0) sub.early = null;
      return false; // handed over already, ahead of the resume
    }
    return true;
  }

  // -- the connection

  // A lost connection: an unsubscribe is done (nothing is subscribed any more),
  // a subscribe is sent again after the reconnect, a publish may or may not have happened.
  function failPending() {
    const lost = new SecurePubError(
      "connection_lost",
      "the connection was lost before the server answered; a publish may or may not have happened",
    );
    const entries = [...pending.values()];
    pending.clear();
    for (const { ok, fail, op } of entries) {
      if (op === "unsubscribe") ok({});
      else fail(lost);
    }
  }

  // What a getTicket() failure is reported as; never holds a ticket (there is none).
  function describe(error, retryAfter) {
    if (error instanceof SecurePubError) {
      if (retryAfter !== undefined && error.retryAfter === undefined) error.retryAfter = retryAfter;
      return error;
    }
    let text;
    try {
      text = error && error.message ? String(error.message) : String(error);
    } catch (e) {
      text = "(no description)";
    }
    const wait = retryAfter === undefined ? "" : " (retry after " + retryAfter + " s)";
    return new SecurePubError("no_ticket", "getTicket() failed: " + text + wait, retryAfter);
  }

  async function open() {
    timer = null;
    if (closedByUser) return;
    setState("connecting", { attempt });
    let ticket;
    try {
      ticket = ticketOf(await getTicket());
    } catch (e) {
      const retryAfter = retryAfterOf(e);
      report(describe(e, retryAfter));
      scheduleReconnect(undefined, retryAfter);
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
      case "welcome": {
        if (socket.protocol !== SUBPROTOCOL) {
          report(new SecurePubError("bad_frame", "the server did not accept " + SUBPROTOCOL));
          socket.close(1000);
          return;
        }
        session = { session: message.session, user: message.user };
        expiresAt = isTime(message.expires_at) ? message.expires_at : null;
        attempt = 0;
        setState("open", session);
        // Resumes first: the server then holds back what an overlapping pattern would
        // deliver of those topics until their missed messages have been sent.
        const all = [...subscriptions.values()];
        for (const sub of all) if (sub.position !== null) sendSubscribe(sub);
        for (const sub of all) if (sub.position === null) sendSubscribe(sub);
        break;
      }
      case "message":
        delivered(message);
        break;
      case "unsubscribed":
        ended(message.topic, message.reason);
        break;
      case "expiring":
        if (isTime(message.expires_at)) expiresAt = message.expires_at;
        startRefresh();
        break;
      case "join":
      case "leave":
        if (typeof message.topic === "string" && typeof message.user === "string") {
          safely(message.op === "join" ? onJoin : onLeave, message.topic, message.user);
        }
        break;
      case "ok":
      case "error":
      case "presence": {
        // An answer: "presence" answers a presence request only.
        const entry = pending.get(message.id);
        if (entry === undefined || (message.op === "presence" && entry.op !== "presence")) {
          if (message.op === "error") report(errorOf(message));
          return;
        }
        pending.delete(message.id);
        if (message.op === "error") entry.fail(errorOf(message));
        else entry.ok(message);
        break;
      }
      default:
        break;
    }
  }

  function closed(code, reason) {
    socket = null;
    session = null;
    expiresAt = null;
    stopRefresh();
    failPending();
    for (const sub of subscriptions.values()) {
      stopRetry(sub);
      sub.state = "idle";
      sub.redo = false;
    }
    if (closedByUser) {
      setState("closed", { code });
      return;
    }
    if (FATAL_CLOSE_CODES.includes(code)) {
      report(new SecurePubError("closed", "the server closed the connection (" + code + " " + reason + ")"));
      for (const sub of subscriptions.values()) {
        settle(sub, new SecurePubError("closed", "the connection is closed"));
      }
      setState("closed", { code });
      return;
    }
    scheduleReconnect(code);
  }

  // The next connection attempt, after the backoff, or after at least `retryAfter`
  // seconds (with jitter) when getTicket() asked for that.
  function scheduleReconnect(code, retryAfter) {
    if (closedByUser) {
      setState("closed", {});
      return;
    }
    let delay = backoff(initialDelay, maxDelay, attempt);
    if (retryAfter !== undefined) delay = Math.max(delay, afterRetryAfter(retryAfter, initialDelay));
    attempt += 1;
    const detail = { delay, code };
    if (retryAfter !== undefined) detail.retryAfter = retryAfter;
    setState("reconnecting", detail);
    timer = setTimeout(open, delay);
  }

  // -- session refresh (SPEC section 9)

  function isTime(value) {
    return typeof value === "number" && Number.isFinite(value) && value > 0;
  }

  function stopRefresh() {
    if (refreshing !== null && refreshing.timer !== null) clearTimeout(refreshing.timer);
    refreshing = null;
  }

  // The server said the session ends soon: refresh it, unless that is under way already.
  function startRefresh() {
    if (state !== "open" || closedByUser || refreshing !== null) return;
    refreshing = { ws: socket, tries: 0, timer: null };
    refresh(refreshing);
  }

  // One try: a fresh ticket from the application, sent in a refresh frame. The ticket
  // goes in that frame only: never in a URL, an error or a log line.
  async function refresh(job) {
    job.timer = null;
    job.tries += 1;
    let ticket;
    try {
      ticket = ticketOf(await getTicket());
    } catch (e) {
      if (refreshing !== job) return;
      const retryAfter = retryAfterOf(e);
      refreshFailed(job, describe(e, retryAfter), retryAfter);
      return;
    }
    if (refreshing !== job || socket !== job.ws || state !== "open") return; // gone meanwhile
    request(
      { op: "refresh", ticket },
      (answer) => {
        if (refreshing !== job) return;
        refreshing = null;
        if (isTime(answer.expires_at)) expiresAt = answer.expires_at;
        safely(onRefresh, { expiresAt });
      },
      (error) => {
        // Lost with its connection: the next connection has a session of its own.
        if (refreshing !== job || error.code === "connection_lost") return;
        refreshFailed(job, error);
      },
    );
  }

  // Report, and try once more after a short jittered delay if the session has time left.
  function refreshFailed(job, error, retryAfter) {
    report(error);
    if (job.tries >= 2) {
      refreshing = null;
      return;
    }
    let delay = backoff(initialDelay, maxDelay, 1);
    if (retryAfter !== undefined) delay = Math.max(delay, afterRetryAfter(retryAfter, initialDelay));
    const left = expiresAt === null ? Infinity : expiresAt * 1000 - Date.now();
    if (delay + 250 >= left) {
      // Too late to try again: the session ends with 4003 and the client reconnects.
      refreshing = null;
      return;
    }
    job.timer = setTimeout(() => {
      if (refreshing === job && socket === job.ws && state === "open") refresh(job);
    }, delay);
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

    /**
     * When the current session ends unless it is refreshed (epoch seconds, by the
     * server's clock), from the welcome and each refresh; null while not open.
     */
    get expiresAt() {
      return expiresAt;
    },

    /**
     * Subscribe now and after every reconnect; resolves once the server said ok, with
     * {offset, epoch, recovered}: the topic's position on a topic with history (the
     * last offset handed over, if already subscribed), else undefined.
     */
    subscribe(topic) {
      if (closedByUser) return Promise.reject(new SecurePubError("closed", "the client is closed"));
      if (typeof topic !== "string") return Promise.reject(new TypeError("a topic is a string"));
      let sub = subscriptions.get(topic);
      if (sub === undefined) {
        sub = newSubscription(topic);
        subscriptions.set(topic, sub);
      }
      if (sub.state === "active") {
        const position = sub.position;
        return Promise.resolve({
          offset: position ? position.offset : undefined,
          epoch: position ? position.epoch : undefined,
          recovered: undefined,
        });
      }
      const promise = new Promise((resolve, reject) => sub.waiters.push({ resolve, reject }));
      if (sub.state === "idle") sendSubscribe(sub);
      return promise;
    },

    /** Stop receiving a topic, now and after reconnects. */
    unsubscribe(topic) {
      const sub = subscriptions.get(topic);
      if (sub !== undefined) {
        forget(sub, new SecurePubError("unsubscribed", "unsubscribed before it was subscribed"));
      }
      if (state !== "open") return Promise.resolve();
      return ask({ op: "unsubscribe", topic });
    },

    /** Publish while open; resolves on ok, rejects on error or if the connection is lost. */
    publish(topic, data) {
      if (closedByUser) return Promise.reject(new SecurePubError("closed", "the client is closed"));
      if (state !== "open") {
        return Promise.reject(new SecurePubError("not_connected", "not connected; try again when open"));
      }
      return ask({ op: "publish", topic, data });
    },

    /**
     * Who is on an exact topic whose rule has presence = true: resolves with
     * {user: number of sessions subscribed}; rejects with a SecurePubError
     * (forbidden, bad_request on a topic without presence, not_connected, ...).
     */
    presence(topic) {
      if (closedByUser) return Promise.reject(new SecurePubError("closed", "the client is closed"));
      if (typeof topic !== "string") return Promise.reject(new TypeError("a topic is a string"));
      if (state !== "open") {
        return Promise.reject(new SecurePubError("not_connected", "not connected; try again when open"));
      }
      return new Promise((resolve, reject) =>
        request(
          { op: "presence", topic },
          (answer) => {
            const users = usersOf(answer.users);
            if (answer.op !== "presence" || users === null) {
              reject(new SecurePubError("bad_frame", "the answer to presence is not a presence map"));
            } else {
              resolve(users);
            }
          },
          reject,
        ),
      );
    },

    /** Close for good: no more reconnects; what is still pending is rejected. */
    close() {
      if (closedByUser) return;
      closedByUser = true;
      if (timer !== null) clearTimeout(timer);
      timer = null;
      for (const sub of subscriptions.values()) {
        stopRetry(sub);
        sub.state = "idle";
        settle(sub, new SecurePubError("closed", "the client is closed"));
      }
      const ws = socket;
      socket = null;
      session = null;
      expiresAt = null;
      stopRefresh();
      failPending();
      if (ws !== null) ws.close(1000);
      setState("closed", {});
    },
  };

  open();
  return client;
}
