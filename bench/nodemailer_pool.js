'use strict';
/**
 * The nodemailer pool baseline: one Node.js process sending over a nodemailer SMTP pool.
 *
 *   NODE_PATH=<dir>/node_modules node bench/nodemailer_pool.js <config.json>
 *
 * Run by bench/nodemailer.py as 2 processes x N/2 connections each, the layout of ours
 * (2 worker processes x POOL_SIZE = N/2) and of the bare loop and I/O floor: Node runs one
 * thread per process, so a single process could use one of the two cores while ours and
 * the loops may use both; two processes give nodemailer the same cores and the same
 * connections per process as everyone else.
 *
 * The config file (JSON) gives host, port, servername, ca_file, user, password, from,
 * subject / text / html templates ("{{ name }}", "{{ email }}": the I/O floor's message,
 * here built by nodemailer as multipart/alternative), connections, first (recipient number
 * for the warm-up), in_flight (sendMail calls outstanding in a run), nodelay (default
 * false), warm_messages and warm_connections.
 *
 * TCP_NODELAY: nodemailer leaves Nagle's algorithm on (Python's asyncio, so aiosmtplib and
 * ours, turns it off). The end of DATA then waits for the server's delayed ACK, about 40 ms
 * per message on Linux, whatever the round-trip time. That is nodemailer as shipped and is
 * the default here; with "nodelay": true every socket gets setNoDelay(true) before it
 * connects (the "nodemailer-nodelay" baseline), to separate that stall from the rest.
 *
 * Phases:
 *   1. V8 warm-up: a throwaway pool of warm_connections sends warm_messages (recipients
 *      jit<n>@example.com) and is closed. V8 compiles in tiers and keeps optimising for
 *      thousands of calls; without this the first runs measure its interpreter (about
 *      2 ms of CPU per message at 20 ms latency, 10 connections, against 1.2 to 1.5 warm).
 *   2. the measured pool (maxConnections = connections) sends 2 x connections messages
 *      (warm<n>@example.com) queued at once, which opens every connection (TCP, greeting,
 *      EHLO, STARTTLS, EHLO, AUTH); then prints "ready".
 *   3. for each line "go <first> <count>" on stdin (the runner writes it to every process
 *      at the same moment): `count` messages to user<first+i>@example.com, one recipient
 *      each, `in_flight` (>= connections) sendMail calls outstanding at any time, so the
 *      pool's queue always holds a message for each connection that frees up; then ONE
 *      JSON line: messages, seconds (start of the run to the last send completion, as the
 *      I/O floor measures), msgs_per_s, cpu_s (process.cpuUsage() user + system over the
 *      run), started / ended (Unix seconds, to merge processes), errors, first_error,
 *      message_bytes (one message as built), connections_open, nodemailer_version.
 *   4. on EOF (or any other line) the pool is closed (QUIT) and the process exits.
 */

const fs = require('fs');
const readline = require('readline');
const { performance } = require('perf_hooks');

let nodemailer;
try {
    nodemailer = require('nodemailer');
} catch (err) {
    console.log(JSON.stringify({ skipped: `cannot load nodemailer: ${err.message}` }));
    process.exit(3);
}
const MailComposer = require('nodemailer/lib/mail-composer');
const nodemailerVersion = require('nodemailer/package.json').version;

function nowS() {
    return (performance.timeOrigin + performance.now()) / 1000;
}

function fill(template, name, email) {
    return template.split('{{ name }}').join(name).split('{{ email }}').join(email);
}

function mailFor(cfg, local, seq) {
    const to = `${local}${seq}@example.com`;
    const name = `User ${seq}`;
    return {
        from: cfg.from,
        to,
        subject: fill(cfg.subject, name, to),
        text: fill(cfg.text, name, to),
        html: fill(cfg.html, name, to),
    };
}

/** Send messages first..first+count-1 with `inFlight` sendMail calls outstanding. */
async function sendAll(transporter, cfg, local, first, count, inFlight) {
    let next = first;
    const end = first + count;
    let sent = 0;
    let errors = 0;
    let firstError = null;
    async function lane() {
        while (next < end) {
            const seq = next++;
            try {
                await transporter.sendMail(mailFor(cfg, local, seq));
                sent++;
            } catch (err) {
                errors++;
                firstError = firstError || String(err && err.message ? err.message : err);
            }
        }
    }
    const lanes = [];
    for (let i = 0; i < Math.min(inFlight, count); i++) lanes.push(lane());
    await Promise.all(lanes);
    return { sent, errors, firstError };
}

function messageBytes(cfg) {
    return new Promise((resolve) => {
        new MailComposer(mailFor(cfg, 'user', 0)).compile().build((err, buf) => {
            resolve(err ? null : buf.length);
        });
    });
}

/** Turn Nagle's algorithm off on every TCP socket this process opens. */
function forceNoDelay() {
    const net = require('net');
    const connect = net.Socket.prototype.connect;
    net.Socket.prototype.connect = function (...args) {
        this.setNoDelay(true);
        return connect.apply(this, args);
    };
}

async function timedRun(transporter, cfg, first, count) {
    const cpu0 = process.cpuUsage();
    const started = nowS();
    const result = await sendAll(transporter, cfg, 'user', first, count, cfg.in_flight);
    const ended = nowS();
    const cpu = process.cpuUsage(cpu0);
    const seconds = ended - started;
    return {
        messages: result.sent,
        seconds,
        msgs_per_s: result.sent / seconds,
        cpu_s: (cpu.user + cpu.system) / 1e6,
        started,
        ended,
        errors: result.errors,
        first_error: result.firstError,
    };
}

async function main() {
    const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
    if (cfg.nodelay) forceNoDelay();
    const connections = cfg.connections;
    const options = (maxConnections) => ({
        pool: true,
        maxConnections,
        maxMessages: Infinity,
        host: cfg.host,
        port: cfg.port,
        secure: false,
        requireTLS: true,
        tls: { ca: fs.readFileSync(cfg.ca_file), servername: cfg.servername },
        auth: { user: cfg.user, pass: cfg.password },
    });

    // Warm V8: a throwaway pool with many connections sends warm_messages, so the code
    // paths are compiled (V8 keeps optimising for thousands of calls) in seconds.
    if (cfg.warm_messages) {
        const warmPool = nodemailer.createTransport(options(cfg.warm_connections));
        const w = cfg.warm_connections;
        const res = await sendAll(warmPool, cfg, 'jit', cfg.first, cfg.warm_messages, 2 * w);
        warmPool.close();
        if (res.errors) throw new Error(`warm-up: ${res.errors} errors, first: ${res.firstError}`);
    }
    // Then the measured pool opens every one of its connections.
    const transporter = nodemailer.createTransport(options(connections));
    const warmup = 2 * connections;
    const warm = await sendAll(transporter, cfg, 'warm', cfg.first, warmup, warmup);
    if (warm.errors) {
        throw new Error(`warm-up: ${warm.errors} errors, first: ${warm.firstError}`);
    }
    const pool = transporter.transporter;
    const connectionsOpen = Array.isArray(pool._connections) ? pool._connections.length : null;
    const bytes = await messageBytes(cfg);
    console.log('ready');

    const rl = readline.createInterface({ input: process.stdin });
    for await (const line of rl) {
        const [command, first, count] = line.trim().split(/\s+/);
        if (command !== 'go') break;
        const result = await timedRun(transporter, cfg, Number(first), Number(count));
        console.log(
            JSON.stringify({
                ...result,
                connections,
                connections_open: connectionsOpen,
                message_bytes: bytes,
                nodemailer_version: nodemailerVersion,
                nodelay: Boolean(cfg.nodelay),
            }),
        );
    }
    rl.close();
    transporter.close();
}

main().catch((err) => {
    console.log(JSON.stringify({ error: String(err && err.stack ? err.stack : err) }));
    process.exit(1);
});
