#!/usr/bin/env node
// host_client.js - a third, independent client for rpcplugin-host, on
// Node's @grpc/grpc-js with messages from the project's .proto files
// (@grpc/proto-loader).  It starts the host the way a go-plugin client
// does (magic cookie and PLUGIN_PROTOCOL_VERSIONS in the environment,
// handshake line from stdout) with a child command, then:
//
//   OK handshake <line>        the first stdout line, 1|1|NET|ADDR|grpc
//   OK health SERVING          grpc.health.v1.Health/Check {service:"plugin"}
//   OK stdio                   StreamStdio delivered the child's stdout and
//                              stderr lines (written before we connected)
//   OK shutdown                plugin.GRPCController/Shutdown -> Empty
//   OK stream-end status=0     the stdio stream finished with OK
//   OK exit 0                  the host exited 0
//
// Any failure prints "FAIL <step>: <why>", kills the host and exits 1.
// Every wait is bounded (--timeout seconds, default 20).
//
//   node host_client.js --host BIN --manifest FILE --proto DIR
//                       [--network unix|tcp] [--module-path DIR] [--timeout S]
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const COOKIE_KEY = 'RPCPLUGIN_NODE_TEST_COOKIE';
const COOKIE_VALUE = 'node-7f3a';

function parseArgs(argv) {
  const o = { network: 'unix', timeout: 20 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--host') o.host = next();
    else if (a === '--manifest') o.manifest = next();
    else if (a === '--proto') o.proto = next();
    else if (a === '--network') o.network = next();
    else if (a === '--module-path') o.modulePath = next();
    else if (a === '--timeout') o.timeout = Number(next());
    else if (a === '--help' || a === '-h') usage();
    else usage(`unknown argument ${a}`);
  }
  if (!o.host || !o.manifest || !o.proto) usage('--host, --manifest and --proto are needed');
  return o;
}

function usage(msg) {
  if (msg) process.stderr.write(`host_client.js: ${msg}\n`);
  process.stderr.write('usage: node host_client.js --host BIN --manifest FILE --proto DIR ' +
    '[--network unix|tcp] [--module-path DIR] [--timeout S]\n');
  process.exit(msg ? 2 : 0);
}

const opts = parseArgs(process.argv.slice(2));
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'rph-node-'));
let host = null;
let hostExit = null; // {code, signal} once exited
const exitWaiters = [];

function say(line) { process.stdout.write(line + '\n'); }

function cleanup() {
  if (host && hostExit === null) host.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
}

function fail(step, why) {
  say(`FAIL ${step}: ${why}`);
  cleanup();
  process.exit(1);
}

function within(step, promise, seconds = opts.timeout) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${seconds} s`)), seconds * 1000);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer))
    .catch((e) => fail(step, e.message || String(e)));
}

function startHost() {
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith('PLUGIN_')) delete env[k];
  env[COOKIE_KEY] = COOKIE_VALUE;
  env.PLUGIN_PROTOCOL_VERSIONS = '1';
  env.PLUGIN_UNIX_SOCKET_DIR = tmp;
  if (opts.modulePath) env.RPCPLUGIN_MODULE_PATH = path.resolve(opts.modulePath);
  const args = [`--magic-cookie=${COOKIE_KEY}=${COOKIE_VALUE}`, '--network', opts.network,
    opts.manifest, '--', '/bin/sh', '-c',
    'echo from-child; echo to-stderr >&2; exec sleep 60'];
  host = spawn(opts.host, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  host.stderr.on('data', (d) => process.stderr.write(d));
  host.on('exit', (code, signal) => {
    hostExit = { code, signal };
    exitWaiters.splice(0).forEach((f) => f(hostExit));
  });
  return new Promise((resolve, reject) => {
    let buf = '';
    host.stdout.on('data', (d) => {
      if (buf === null) return;
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        const line = buf.slice(0, nl);
        buf = null;
        resolve(line);
      }
    });
    host.on('exit', (code) => reject(new Error(`host exited (${code}) before the handshake`)));
    host.on('error', reject);
  });
}

function waitExit() {
  if (hostExit) return Promise.resolve(hostExit);
  return new Promise((resolve) => exitWaiters.push(resolve));
}

function loadServices() {
  const files = ['health.proto', 'grpc_stdio.proto', 'grpc_controller.proto'];
  const def = protoLoader.loadSync(files, {
    includeDirs: [opts.proto, '/usr/include'],
    keepCase: true, enums: String, longs: String, defaults: true,
  });
  const pkg = grpc.loadPackageDefinition(def);
  return {
    Health: pkg.grpc.health.v1.Health,
    Stdio: pkg.plugin.GRPCStdio,
    Controller: pkg.plugin.GRPCController,
  };
}

function deadline() { return new Date(Date.now() + opts.timeout * 1000); }

function unary(client, method, req) {
  return new Promise((resolve, reject) => {
    client[method](req, { deadline: deadline() }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

async function main() {
  const line = await within('handshake', startHost());
  const m = /^1\|1\|(unix|tcp)\|([^|]+)\|grpc$/.exec(line);
  if (!m || m[1] !== opts.network) fail('handshake', `unexpected line ${JSON.stringify(line)}`);
  say(`OK handshake ${line}`);
  const target = m[1] === 'unix' ? `unix:${m[2]}` : m[2];
  const svc = loadServices();
  const creds = grpc.credentials.createInsecure();

  const health = new svc.Health(target, creds);
  const res = await within('health', unary(health, 'Check', { service: 'plugin' }));
  if (res.status !== 'SERVING') fail('health', `status ${res.status}`);
  say('OK health SERVING');

  // The child wrote its lines right after the handshake, most likely before
  // this stream opened: they were queued and must arrive now.
  const stdio = new svc.Stdio(target, creds);
  const call = stdio.StreamStdio({}, { deadline: new Date(Date.now() + 60000) });
  const got = { STDOUT: '', STDERR: '' };
  let onData = null;
  const ended = new Promise((resolve) => call.on('status', resolve));
  call.on('data', (msg) => {
    got[msg.channel] += Buffer.from(msg.data).toString();
    if (onData) onData();
  });
  call.on('error', () => {}); // the status event carries the outcome
  await within('stdio', new Promise((resolve) => {
    const check = () => {
      if (got.STDOUT.includes('from-child\n') && got.STDERR.includes('to-stderr\n')) resolve();
    };
    onData = check;
    check();
  }));
  say('OK stdio');

  const ctl = new svc.Controller(target, creds);
  await within('shutdown', unary(ctl, 'Shutdown', {}));
  say('OK shutdown');

  const st = await within('stream-end', ended);
  if (st.code !== grpc.status.OK) fail('stream-end', `status ${st.code} ${st.details}`);
  say(`OK stream-end status=${st.code}`);

  const ex = await within('exit', waitExit());
  if (ex.code !== 0) fail('exit', `code ${ex.code} signal ${ex.signal}`);
  say('OK exit 0');
  if (fs.readdirSync(tmp).length !== 0) fail('exit', `socket directory left in ${tmp}`);
  [health, stdio, ctl].forEach((c) => c.close());
  cleanup();
}

main().catch((e) => fail('main', e.stack || String(e)));
