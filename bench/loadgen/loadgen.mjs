// securepub load generator in Node.js: the fallback of bench/run.py
// (--generator node) where no C compiler or OpenSSL headers are at hand. The
// default generator is wsload.c, which costs about half the CPU per TLS
// handshake and per message; this one supports the fanout and connect
// scenarios with the same options and output.
//
//   node loadgen.mjs --scenario fanout --target ours --port 9443 --ca ca.pem \
//       --api-key KEY --server-pid PID --subscribers 1000 --mode flood
//
// A minimal WebSocket client on node:tls (no dependency): it only counts
// frames and reads the send timestamp out of each message. Publishes go
// through the HTTPS API (POST /v1/publish) over keep-alive connections;
// tickets (ours only) through POST /v1/tickets. Every loop is bounded in
// count and time, all traffic goes to 127.0.0.1, and the process exits by itself.

import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import tls from "node:tls";

// ---------------------------------------------------------------- options

const DEFAULTS = {
  scenario: "fanout", // fanout | connect
  target: "ours", // ours | ceiling
  host: "127.0.0.1",
  port: 0,
  ca: "",
  "api-key": "",
  "server-pid": 0,
  mode: "flood", // flood | rate
  rate: 10, // publishes per second in rate mode
  subscribers: 1000,
  connections: 10000,
  topic: "bench.fanout",
  duration: 10, // seconds measured
  warmup: 2, // seconds before measuring
  drain: 15, // seconds to wait for the last messages
  publishers: 16, // keep-alive HTTPS connections publishing in parallel
  "payload-bytes": 200,
  concurrency: 32, // handshakes in flight (Twisted's listen backlog is 50)
  settle: 2, // seconds idle before reading RSS in connect
  timeout: 120, // hard limit for the whole run, seconds
};

function parseArgs(argv) {
  const opts = { ...DEFAULTS };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new Error(`unexpected argument ${arg}`);
    const name = arg.slice(2);
    if (!(name in DEFAULTS)) throw new Error(`unknown option ${arg}`);
    const value = argv[++i];
    opts[name] = typeof DEFAULTS[name] === "number" ? Number(value) : value;
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
// One context for every connection: passing `ca` to each tls.connect would
// parse the CA and build a fresh OpenSSL context per connection.
const SECURE_CONTEXT = tls.createSecureContext(opts.ca ? { ca: readFileSync(opts.ca) } : {});
const TLS_OPTIONS = {
  host: opts.host,
  port: opts.port,
  secureContext: SECURE_CONTEXT,
  servername: "localhost",
};
const OURS = opts.target === "ours";

function log(message) {
  process.stderr.write(`[loadgen ${opts.target} ${opts.scenario}] ${message}\n`);
}

// The runner starts and stops its profiler on these lines.
function mark(what) {
  process.stderr.write(`@@${what}\n`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const nowNs = () => Math.round(performance.now() * 1e6);

// Whole-run watchdog: the generator never outlives --timeout.
const watchdog = setTimeout(() => {
  log(`timeout after ${opts.timeout} s`);
  process.exit(3);
}, opts.timeout * 1000);
watchdog.unref();

// ---------------------------------------------------------------- /proc

const CLK_TCK = 100;

function cpuTicks(pid) {
  // utime + stime of a process, in seconds.
  const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

function rssKiB(pid) {
  const status = readFileSync(`/proc/${pid}/status`, "latin1");
  const match = /VmRSS:\s+(\d+) kB/.exec(status);
  return match ? Number(match[1]) : NaN;
}

function selfCpu() {
  const usage = process.cpuUsage();
  return (usage.user + usage.system) / 1e6;
}

class CpuMeter {
  constructor(pid) {
    this.pid = pid;
  }
  start() {
    this.t0 = performance.now();
    this.server0 = this.pid ? cpuTicks(this.pid) : 0;
    this.self0 = selfCpu();
  }
  stop() {
    const wall = (performance.now() - this.t0) / 1000;
    return {
      wall_s: wall,
      server_cpu: this.pid ? (cpuTicks(this.pid) - this.server0) / wall : null,
      generator_cpu: (selfCpu() - this.self0) / wall,
    };
  }
}

// ---------------------------------------------------------------- latency histogram

// Log-linear buckets over microseconds: exact below 1024 us, then 128 buckets
// per power of two (< 1 % error), up to about 2^36 us.
const SUB = 128;
class Histogram {
  constructor() {
    this.counts = new Float64Array(1024 + 27 * SUB);
    this.n = 0;
    this.max = 0;
  }
  record(us) {
    let v = us < 0 ? 0 : Math.floor(us);
    if (v > this.max) this.max = v;
    let index;
    if (v < 1024) index = v;
    else {
      const exp = 31 - Math.clz32(v); // >= 10
      const sub = Math.floor((v - 2 ** exp) / (2 ** exp / SUB));
      index = 1024 + (exp - 10) * SUB + sub;
      if (index >= this.counts.length) index = this.counts.length - 1;
    }
    this.counts[index]++;
    this.n++;
  }
  valueAt(index) {
    if (index < 1024) return index;
    const exp = 10 + Math.floor((index - 1024) / SUB);
    const sub = (index - 1024) % SUB;
    return 2 ** exp + (sub + 0.5) * (2 ** exp / SUB);
  }
  percentile(p) {
    if (this.n === 0) return null;
    const rank = Math.ceil((p / 100) * this.n);
    let seen = 0;
    for (let i = 0; i < this.counts.length; i++) {
      seen += this.counts[i];
      if (seen >= rank) return this.valueAt(i);
    }
    return this.max;
  }
}

// ---------------------------------------------------------------- HTTPS keep-alive client

// A minimal HTTP/1.1 client over one TLS connection, one request at a time.
class HttpConn {
  constructor() {
    this.socket = null;
    this.pending = null;
    this.buf = null;
  }
  connect() {
    return new Promise((resolve, reject) => {
      const socket = tls.connect(TLS_OPTIONS);
      socket.setNoDelay(true);
      socket.once("secureConnect", () => resolve());
      socket.once("error", reject);
      socket.on("data", (chunk) => this.onData(chunk));
      socket.on("close", () => {
        if (this.pending) this.pending.reject(new Error("HTTP connection closed"));
        this.pending = null;
        this.socket = null;
      });
      this.socket = socket;
    });
  }
  async request(path, body) {
    if (this.socket === null) await this.connect();
    const payload = Buffer.from(body);
    const head =
      `POST ${path} HTTP/1.1\r\nHost: localhost:${opts.port}\r\n` +
      `Authorization: Bearer ${opts["api-key"]}\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${payload.length}\r\n\r\n`;
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject };
      this.socket.write(Buffer.concat([Buffer.from(head), payload]));
    });
  }
  onData(chunk) {
    this.buf = this.buf ? Buffer.concat([this.buf, chunk]) : chunk;
    const end = this.buf.indexOf("\r\n\r\n");
    if (end < 0) return;
    const head = this.buf.toString("latin1", 0, end);
    const status = Number(head.slice(9, 12));
    const lengthMatch = /\r\ncontent-length:\s*(\d+)/i.exec(head);
    const length = lengthMatch ? Number(lengthMatch[1]) : 0;
    if (this.buf.length < end + 4 + length) return;
    const body = this.buf.toString("utf8", end + 4, end + 4 + length);
    this.buf = this.buf.length > end + 4 + length ? this.buf.subarray(end + 4 + length) : null;
    const pending = this.pending;
    this.pending = null;
    if (pending) pending.resolve({ status, body });
  }
  close() {
    if (this.socket) this.socket.destroy();
  }
}

class HttpPool {
  constructor(size) {
    this.idle = Array.from({ length: size }, () => new HttpConn());
    this.waiters = [];
  }
  async post(path, value) {
    while (this.idle.length === 0) await new Promise((resolve) => this.waiters.push(resolve));
    const conn = this.idle.pop();
    try {
      return await conn.request(path, typeof value === "string" ? value : JSON.stringify(value));
    } finally {
      this.idle.push(conn);
      const waiter = this.waiters.shift();
      if (waiter) waiter();
    }
  }
  close() {
    for (const conn of this.idle) conn.close();
  }
}

async function issueTicket(pool, user) {
  const { status, body } = await pool.post("/v1/tickets", {
    user,
    client_ip: "127.0.0.1",
    subscribe: ["bench.>"],
    ttl: 300,
  });
  if (status !== 201) throw new Error(`ticket: HTTP ${status} ${body.slice(0, 200)}`);
  return JSON.parse(body).ticket;
}

// ---------------------------------------------------------------- WebSocket client

const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

// Frames from the server are unmasked; ours must be masked (RFC 6455 5.3).
function maskedFrame(opcode, payload) {
  const mask = randomBytes(4);
  const n = payload.length;
  const headLen = n < 126 ? 2 : 4;
  const frame = Buffer.allocUnsafe(headLen + 4 + n);
  frame[0] = 0x80 | opcode;
  if (n < 126) frame[1] = 0x80 | n;
  else {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(n, 2);
  }
  mask.copy(frame, headLen);
  for (let i = 0; i < n; i++) frame[headLen + 4 + i] = payload[i] ^ mask[i & 3];
  return frame;
}

class WsConn {
  // onText(buffer, start, end) is called for every complete text frame.
  constructor(onText) {
    this.onText = onText;
    this.socket = null;
    this.buf = null;
    this.open = false;
  }

  connect(ticket) {
    return new Promise((resolve, reject) => {
      const key = randomBytes(16).toString("base64");
      const protocols = ticket ? `securepub.v1, ticket.${ticket}` : "securepub.v1";
      const socket = tls.connect(TLS_OPTIONS);
      this.socket = socket;
      socket.setNoDelay(true);
      let settled = false;
      const fail = (error) => {
        if (!settled) {
          settled = true;
          socket.destroy();
          reject(error);
        }
      };
      socket.once("error", fail);
      socket.once("close", () => {
        this.open = false;
        fail(new Error("closed during handshake"));
      });
      socket.once("secureConnect", () => {
        socket.write(
          `GET /ws HTTP/1.1\r\nHost: localhost:${opts.port}\r\nUpgrade: websocket\r\n` +
            `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\n` +
            `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ${protocols}\r\n\r\n`,
        );
      });
      let head = null;
      const onHandshakeData = (chunk) => {
        head = head ? Buffer.concat([head, chunk]) : chunk;
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) {
          if (head.length > 16384) fail(new Error("handshake response too long"));
          return;
        }
        const text = head.toString("latin1", 0, end);
        if (!text.startsWith("HTTP/1.1 101")) {
          fail(new Error(`handshake refused: ${text.split("\r\n")[0]}`));
          return;
        }
        const accept = createHash("sha1")
          .update(key + WS_GUID)
          .digest("base64");
        if (!text.toLowerCase().includes(`sec-websocket-accept: ${accept.toLowerCase()}`)) {
          fail(new Error("bad Sec-WebSocket-Accept"));
          return;
        }
        socket.removeListener("data", onHandshakeData);
        socket.on("data", (data) => this.onData(data));
        this.open = true;
        settled = true;
        const rest = head.subarray(end + 4);
        if (rest.length) this.onData(rest);
        resolve(this);
      };
      socket.on("data", onHandshakeData);
    });
  }

  onData(chunk) {
    let buf = chunk;
    if (this.buf !== null) {
      buf = Buffer.concat([this.buf, chunk]);
      this.buf = null;
    }
    const len = buf.length;
    let off = 0;
    while (len - off >= 2) {
      const b0 = buf[off];
      let plen = buf[off + 1] & 0x7f;
      let hdr = 2;
      if (plen === 126) {
        if (len - off < 4) break;
        plen = buf.readUInt16BE(off + 2);
        hdr = 4;
      } else if (plen === 127) {
        if (len - off < 10) break;
        plen = buf.readUInt32BE(off + 6);
        hdr = 10;
      }
      if (len - off < hdr + plen) break;
      const start = off + hdr;
      const end = start + plen;
      const opcode = b0 & 0x0f;
      if (opcode === 1) this.onText(buf, start, end);
      else if (opcode === 9) this.socket.write(maskedFrame(10, buf.subarray(start, end)));
      else if (opcode === 8) {
        this.open = false;
        this.socket.destroy();
        return;
      }
      off = end;
    }
    if (off < len) this.buf = buf.subarray(off);
  }

  sendText(text) {
    this.socket.write(maskedFrame(1, Buffer.from(text)));
  }

  close() {
    this.open = false;
    if (this.socket) this.socket.destroy();
  }
}

// Run `count` tasks with at most `width` in flight; returns the errors seen.
async function windowed(count, width, task) {
  let next = 0;
  const errors = [];
  async function worker() {
    while (next < count) {
      const index = next++;
      try {
        await task(index);
      } catch (error) {
        errors.push(String(error.message || error));
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(width, count) }, worker));
  return errors;
}

// ---------------------------------------------------------------- payload

const DATA_PREFIX = Buffer.from('"data":{"t":');
const LETTER_M = 0x6d; // {"op":"m... is a message frame

function payload(tNs) {
  const head = `{"t":${tNs},"pad":"`;
  const padLength = Math.max(0, opts["payload-bytes"] - head.length - 2);
  return `${head}${"x".repeat(padLength)}"}`;
}

// ---------------------------------------------------------------- fanout

async function fanout() {
  const S = opts.subscribers;
  const pool = new HttpPool(Math.max(opts.publishers, 4));
  const hist = new Histogram();
  let received = 0;
  let recording = false;
  const perConn = new Uint32Array(S);

  const conns = [];
  const subscribed = new Array(S).fill(false);
  let subscribedCount = 0;
  let onAllSubscribed = null;

  function makeHandler(index) {
    return (buf, start, end) => {
      if (buf[start + 7] === LETTER_M) {
        received++;
        perConn[index]++;
        if (recording) {
          const at = buf.indexOf(DATA_PREFIX, start);
          if (at >= 0 && at < end) {
            let t = 0;
            for (let i = at + DATA_PREFIX.length; i < end; i++) {
              const c = buf[i];
              if (c < 0x30 || c > 0x39) break;
              t = t * 10 + (c - 0x30);
            }
            hist.record((nowNs() - t) / 1000);
          }
        }
        return;
      }
      // welcome, ok or error: the first "ok" means the subscription is in place.
      const text = buf.toString("utf8", start, end);
      if (text.startsWith('{"op":"ok"') && !subscribed[index]) {
        subscribed[index] = true;
        subscribedCount++;
        if (subscribedCount === S && onAllSubscribed) onAllSubscribed();
      } else if (text.startsWith('{"op":"error"')) {
        log(`error frame: ${text.slice(0, 200)}`);
      }
    };
  }

  const allSubscribed = new Promise((resolve) => {
    onAllSubscribed = resolve;
  });
  const setupStart = performance.now();
  const errors = await windowed(S, opts.concurrency, async (index) => {
    const ticket = OURS ? await issueTicket(pool, `sub${index}`) : null;
    const conn = new WsConn(makeHandler(index));
    await conn.connect(ticket);
    conns[index] = conn;
    conn.sendText(JSON.stringify({ op: "subscribe", id: 1, topic: opts.topic }));
  });
  if (errors.length) throw new Error(`${errors.length} subscribers failed: ${errors[0]}`);
  await Promise.race([allSubscribed, sleep(30000)]);
  if (subscribedCount !== S) throw new Error(`only ${subscribedCount}/${S} subscribed`);
  log(`${S} subscribers in ${((performance.now() - setupStart) / 1000).toFixed(1)} s`);

  // Publishers: flood keeps one request in flight per connection; rate mode
  // sends on a schedule (one at a time is plenty at tens per second).
  let published = 0;
  let publishErrors = 0;
  let stopping = false;
  const body = (t) => `{"topic":"${opts.topic}","data":${payload(t)}}`;
  async function publishOne() {
    const { status, body: answer } = await pool.post("/v1/publish", body(nowNs()));
    if (status === 202) published++;
    else {
      publishErrors++;
      if (publishErrors < 5) log(`publish: HTTP ${status} ${answer.slice(0, 200)}`);
    }
  }
  const publisherTasks = [];
  if (opts.mode === "flood") {
    for (let p = 0; p < opts.publishers; p++) {
      publisherTasks.push(
        (async () => {
          while (!stopping && publishErrors < 100) await publishOne();
        })(),
      );
    }
  } else {
    publisherTasks.push(
      (async () => {
        const interval = 1000 / opts.rate;
        const begin = performance.now();
        for (let k = 0; !stopping && publishErrors < 100; k++) {
          const due = begin + k * interval;
          const wait = due - performance.now();
          if (wait > 0) await sleep(wait);
          if (stopping) break;
          publishOne().catch((error) => {
            publishErrors++;
            log(`publish failed: ${error.message}`);
          });
        }
      })(),
    );
  }

  await sleep(opts.warmup * 1000);
  const meter = new CpuMeter(opts["server-pid"]);
  const received0 = received;
  const published0 = published;
  recording = true;
  mark("window-start");
  meter.start();
  await sleep(opts.duration * 1000);
  const cpu = meter.stop();
  mark("window-end");
  recording = false;
  const receivedInWindow = received - received0;
  const publishedInWindow = published - published0;
  stopping = true;
  await Promise.all(publisherTasks);
  await sleep(50); // rate mode: let the last request come back
  const drainStart = performance.now();
  const expected = () => published * S;
  while (received < expected() && performance.now() - drainStart < opts.drain * 1000) {
    await sleep(20);
  }
  const drainS = (performance.now() - drainStart) / 1000;
  const lost = expected() - received;
  let shortConns = 0;
  for (let i = 0; i < S; i++) if (perConn[i] !== published) shortConns++;
  for (const conn of conns) conn.close();
  pool.close();
  return {
    subscribers: S,
    mode: opts.mode,
    rate: opts.mode === "rate" ? opts.rate : null,
    topic: opts.topic,
    publishers: opts.publishers,
    payload_bytes: opts["payload-bytes"],
    delivered_per_s: receivedInWindow / cpu.wall_s,
    published_per_s: publishedInWindow / cpu.wall_s,
    latency_p50_ms: hist.n ? hist.percentile(50) / 1000 : null,
    latency_p99_ms: hist.n ? hist.percentile(99) / 1000 : null,
    latency_max_ms: hist.n ? hist.max / 1000 : null,
    latency_samples: hist.n,
    published,
    delivered: received,
    lost,
    connections_short: shortConns,
    publish_errors: publishErrors,
    drain_s: drainS,
    ...cpu,
  };
}

// ---------------------------------------------------------------- connect

async function connect() {
  const C = opts.connections;
  const pool = OURS ? new HttpPool(4) : null;
  const pid = opts["server-pid"];
  const rssBefore = pid ? rssKiB(pid) : NaN;
  const conns = [];
  const meter = new CpuMeter(pid);
  mark("window-start");
  meter.start();
  const errors = await windowed(C, opts.concurrency, async (index) => {
    const ticket = OURS ? await issueTicket(pool, `conn${index}`) : null;
    const conn = new WsConn(() => {});
    await conn.connect(ticket);
    conns.push(conn);
  });
  const cpu = meter.stop();
  mark("window-end");
  if (pool) pool.close();
  await sleep(opts.settle * 1000);
  const rssAfter = pid ? rssKiB(pid) : NaN;
  const open = conns.filter((conn) => conn.open).length;
  for (const conn of conns) conn.close();
  if (errors.length) log(`${errors.length} failures, first: ${errors[0]}`);
  return {
    connections: C,
    concurrency: opts.concurrency,
    handshakes_per_s: conns.length / cpu.wall_s,
    opened: conns.length,
    still_open: open,
    failed: errors.length,
    first_error: errors[0] || null,
    rss_before_kib: rssBefore,
    rss_after_kib: rssAfter,
    rss_per_conn_kib: (rssAfter - rssBefore) / Math.max(1, open),
    ...cpu,
  };
}

// ---------------------------------------------------------------- main

async function main() {
  const started = new Date().toISOString();
  let result;
  if (opts.scenario === "fanout") result = await fanout();
  else if (opts.scenario === "connect") result = await connect();
  else throw new Error(`unknown scenario ${opts.scenario}`);
  process.stdout.write(
    `${JSON.stringify({ scenario: opts.scenario, target: opts.target, started, ...result })}\n`,
  );
}

main().then(
  () => process.exit(0),
  (error) => {
    log(`failed: ${error.stack || error}`);
    process.exit(2);
  },
);
