// Shared helpers of the Node client suite. tests/other_languages.rs starts the
// simulator and the gateway and passes their addresses in SYNTHOME_* variables.
'use strict';

const fs = require('node:fs');
const path = require('node:path');

const repo = path.resolve(__dirname, '../../../..');
const protoDir = path.join(repo, 'proto');
const example = require(path.join(repo, 'docs/examples/node/watch.js'));

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run through cargo test --test other_languages`);
  return value;
}

const apiKey = env('SYNTHOME_TEST_API_KEY');

/** A client that uses the service config recommended in docs/clients.md. */
function client() {
  const serviceConfig = fs.readFileSync(path.join(repo, 'docs/examples/service_config.json'), 'utf8');
  return example.loadClient(env('SYNTHOME_GATEWAY_ADDR'), protoDir, {
    'grpc.service_config': serviceConfig,
  });
}

async function json(url, init = {}) {
  const response = await fetch(url, init);
  if (!response.ok) throw new Error(`${init.method ?? 'GET'} ${url}: ${response.status}`);
  return response.json();
}

/** Creates an execution on the simulator; jobs are {id, simulate, dependsOn}. */
async function createExecution(jobs) {
  const nodes = jobs.map((job) => ({
    id: job.id,
    type: job.type ?? 'generate',
    params: { simulate: job.simulate ?? {} },
    dependsOn: job.dependsOn ?? [],
  }));
  const created = await json(`${env('SYNTHOME_SIMULATOR_URL')}/api/execute`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${apiKey}` },
    body: JSON.stringify({ executionPlan: { jobs: nodes }, options: {} }),
  });
  return created.executionId;
}

/** Pollers the main gateway runs now, read through the Rust test's probe. */
async function activePollers() {
  return (await json(`${env('SYNTHOME_PROBE_URL')}/pollers/main`)).activePollers;
}

/** Polls condition() until it is truthy, for at most timeoutMs. */
async function waitFor(condition, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((wake) => setTimeout(wake, 5));
  }
}

module.exports = { activePollers, apiKey, client, createExecution, example, waitFor };
