#!/usr/bin/env node
// A Node.js machine client of the session authority, using only @grpc/grpc-js
// and @grpc/proto-loader with the .proto files of this repository.
//
// It grants a lease, so the authority must run with --insecure-dev, which
// takes the principal from GrantRequest. It calls the protected
// demo.v1.Payments service with the lease in the `session-lease` metadata key
// and, with --telemetry, keeps a demo.v1.Telemetry stream open. Then it
// revokes its own lease through the authority's Revoke and expects the next
// call and the open stream to end with UNAUTHENTICATED and the
// `session-end-reason: revoked` trailer.
//
// Usage:
//   node client.js --authority HOST:PORT --payments HOST:PORT [--telemetry HOST:PORT]
//                  [--principal NAME] [--tier NAME]
// Prints one JSON object on stdout. Exit status: 0 when every step behaved as
// expected, 1 otherwise, 2 for invalid usage.

'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPOSITORY_ROOT = path.resolve(__dirname, '..', '..');
const AUTHORITY_PROTO = path.join(REPOSITORY_ROOT, 'protos', 'session_authority', 'v1', 'session_authority.proto');
const DEMO_PROTO = path.join(REPOSITORY_ROOT, 'examples', 'protos', 'demo', 'v1', 'demo.proto');

const LEASE_METADATA_KEY = 'session-lease';
const END_REASON_TRAILER_KEY = 'session-end-reason';
const CALL_TIMEOUT_MS = 5000;
// The enforcer hears of the revoke on its watch stream; calls in between may
// still pass, so the client retries for a bounded time.
const REJECTION_WAIT_MS = 5000;
const RETRY_PAUSE_MS = 100;

const USAGE = 'usage: node client.js --authority HOST:PORT --payments HOST:PORT [--telemetry HOST:PORT] [--principal NAME] [--tier NAME]';

function parseArguments(argv) {
  const options = { principal: 'node-client', tier: 'payments', telemetry: null };
  const names = new Set(['--authority', '--payments', '--telemetry', '--principal', '--tier']);
  for (let index = 0; index < argv.length; index += 2) {
    const name = argv[index];
    const value = argv[index + 1];
    if (!names.has(name) || value === undefined) {
      throw new Error(`invalid argument ${JSON.stringify(name)}; ${USAGE}`);
    }
    options[name.slice(2)] = value;
  }
  for (const required of ['authority', 'payments']) {
    if (!options[required]) {
      throw new Error(`--${required} is required; ${USAGE}`);
    }
  }
  return options;
}

function loadPackages() {
  // keepCase keeps the proto field names (lease_id), as on the wire in JSON.
  const loaderOptions = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
  const authority = grpc.loadPackageDefinition(protoLoader.loadSync(AUTHORITY_PROTO, loaderOptions));
  const demo = grpc.loadPackageDefinition(protoLoader.loadSync(DEMO_PROTO, loaderOptions));
  return { authorityPackage: authority.session_authority.v1, demoPackage: demo.demo.v1 };
}

function deadline() {
  return new Date(Date.now() + CALL_TIMEOUT_MS);
}

function unary(client, method, request, metadata) {
  return new Promise((resolve) => {
    client[method](request, metadata || new grpc.Metadata(), { deadline: deadline() }, (error, response) => {
      resolve(error ? { error } : { response });
    });
  });
}

function describeError(error) {
  const trailer = error.metadata ? error.metadata.get(END_REASON_TRAILER_KEY) : [];
  return {
    code: grpc.status[error.code] || String(error.code),
    code_number: error.code,
    session_end_reason: trailer.length > 0 ? String(trailer[0]) : null,
    details: error.details,
  };
}

function describeResult(method, result) {
  if (result.error) {
    return { method, ...describeError(result.error) };
  }
  return { method, code: 'OK' };
}

function sleep(milliseconds) {
  return new Promise((resolve) => setTimeout(resolve, milliseconds));
}

// Opens a bidi Telemetry.Stream and sends a reading every 200 ms until the
// stream ends; `ended` resolves with how it ended.
function openReadingStream(demoPackage, target, metadata) {
  const client = new demoPackage.Telemetry(target, grpc.credentials.createInsecure());
  const call = client.Stream(metadata);
  let acks = 0;
  let sequence = 0;
  const firstAck = new Promise((resolve) => call.once('data', resolve));
  call.on('data', () => { acks += 1; });
  const timer = setInterval(() => {
    sequence += 1;
    call.write({ source: 'node-client', sequence: String(sequence), value: sequence });
  }, 200);
  const ended = new Promise((resolve) => {
    call.on('error', (error) => resolve(describeError(error)));
    call.on('end', () => resolve({ code: 'OK', code_number: 0, session_end_reason: null, details: '' }));
  }).then((outcome) => {
    clearInterval(timer);
    client.close();
    return { ...outcome, acks };
  });
  return { firstAck, ended, cancel: () => call.cancel() };
}

async function callUntilRejected(payments, metadata) {
  const started = Date.now();
  let attempts = 0;
  for (;;) {
    attempts += 1;
    const result = await unary(payments, 'Balance', { account: 'node-ops' }, metadata);
    if (result.error || Date.now() - started > REJECTION_WAIT_MS) {
      return { ...describeResult('Balance', result), attempts };
    }
    await sleep(RETRY_PAUSE_MS);
  }
}

async function run(options) {
  const { authorityPackage, demoPackage } = loadPackages();
  const insecure = grpc.credentials.createInsecure();
  const authority = new authorityPackage.SessionAuthority(options.authority, insecure);
  const payments = new demoPackage.Payments(options.payments, insecure);
  const report = { ok: false, principal: options.principal, tier: options.tier };

  try {
    const granted = await unary(authority, 'Grant', { principal: options.principal, tier: options.tier });
    if (granted.error) {
      report.grant = describeError(granted.error);
      return report;
    }
    const lease = granted.response.lease;
    report.fingerprint = lease.fingerprint;
    report.grant = { code: 'OK', state: lease.state, tier: lease.tier, principal: lease.principal };

    const metadata = new grpc.Metadata();
    metadata.set(LEASE_METADATA_KEY, granted.response.lease_id);

    const withoutLease = await unary(payments, 'Balance', { account: 'node-ops' });
    report.without_lease = describeResult('Balance', withoutLease);
    report.before_revoke = [
      describeResult('Balance', await unary(payments, 'Balance', { account: 'node-ops' }, metadata)),
      describeResult('Transfer', await unary(payments, 'Transfer', { from_account: 'node-ops', to_account: 'vendor', amount_cents: '250' }, metadata)),
    ];

    let stream = null;
    if (options.telemetry) {
      stream = openReadingStream(demoPackage, options.telemetry, metadata);
      await Promise.race([stream.firstAck, sleep(CALL_TIMEOUT_MS)]);
    }

    const revoked = await unary(authority, 'Revoke', { lease_id: granted.response.lease_id });
    report.revoke = revoked.error
      ? describeError(revoked.error)
      : { code: 'OK', state: revoked.response.lease.state, end_reason: revoked.response.lease.end_reason };

    report.after_revoke = await callUntilRejected(payments, metadata);
    if (stream !== null) {
      report.stream = await Promise.race([
        stream.ended,
        sleep(REJECTION_WAIT_MS).then(() => {
          stream.cancel();
          return { code: 'TIMEOUT', details: `the stream was still open ${REJECTION_WAIT_MS} ms after the revoke` };
        }),
      ]);
    }

    const rejectedAsRevoked = (outcome) => outcome.code === 'UNAUTHENTICATED' && outcome.session_end_reason === 'revoked';
    report.ok = report.without_lease.code === 'UNAUTHENTICATED'
      && report.before_revoke.every((call) => call.code === 'OK')
      && report.revoke.code === 'OK'
      && rejectedAsRevoked(report.after_revoke)
      && (stream === null || rejectedAsRevoked(report.stream));
    return report;
  } finally {
    authority.close();
    payments.close();
  }
}

async function main() {
  let options;
  try {
    options = parseArguments(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`client.js: ${error.message}\n`);
    return 2;
  }
  const report = await run(options);
  process.stdout.write(`${JSON.stringify(report)}\n`);
  return report.ok ? 0 : 1;
}

main().then(
  (status) => { process.exitCode = status; },
  (error) => {
    process.stderr.write(`client.js: ${error.stack || error}\n`);
    process.exitCode = 1;
  },
);
