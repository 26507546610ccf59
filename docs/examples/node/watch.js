// Watch one execution to its end from Node, reconnecting with last_revision.
// Run by tests/clients/node/test/watch.test.js against a real gateway; quoted in
// docs/clients.md. Needs @grpc/grpc-js and @grpc/proto-loader.
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const FINAL_STATES = new Set(['EXECUTION_STATE_COMPLETED', 'EXECUTION_STATE_FAILED']);
// Codes after which watching again can succeed; any other code is final.
const RECONNECT_CODES = new Set([grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED]);

/** A client of ExecutionStatusService, loaded from the .proto files under protoDir. */
function loadClient(address, protoDir, channelOptions = {}) {
  const definition = protoLoader.loadSync('synthome/status/v1/execution_status.proto', {
    includeDirs: [protoDir],
    longs: String, // revisions are uint64: keep them exact
    enums: String,
    defaults: true,
  });
  const { ExecutionStatusService } = grpc.loadPackageDefinition(definition).synthome.status.v1;
  return new ExecutionStatusService(address, grpc.credentials.createInsecure(), channelOptions);
}

/** Call metadata carrying a Synthome API key. */
function withKey(apiKey) {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${apiKey}`);
  return metadata;
}

/**
 * Streams executionId until it completes or fails and resolves with the final
 * execution. Reconnects with lastRevision after UNAVAILABLE or RESOURCE_EXHAUSTED,
 * with exponential backoff and jitter; rejects on a final error or after maxAttempts
 * streams in a row ended without progress.
 */
async function watch(client, executionId, options = {}) {
  const {
    apiKey,
    onMessage = () => {},
    maxAttempts = 10,
    initialBackoffMs = 500,
    maxBackoffMs = 30000,
  } = options;
  let lastRevision = '0';
  let backoffMs = initialBackoffMs;
  let failures = 0;
  for (;;) {
    const final = await new Promise((resolve, reject) => {
      let finalExecution = null;
      const call = client.WatchExecution({ executionId, lastRevision }, withKey(apiKey));
      call.on('data', (response) => {
        onMessage(response);
        if (!response.heartbeat) {
          lastRevision = response.execution.revision;
          backoffMs = initialBackoffMs;
          failures = 0;
        }
        if (FINAL_STATES.has(response.execution.state)) finalExecution = response.execution;
      });
      call.on('error', (error) => (RECONNECT_CODES.has(error.code) ? resolve(null) : reject(error)));
      call.on('status', (status) => status.code === grpc.status.OK && resolve(finalExecution));
    });
    if (final) return final; // the stream ended with OK right after the final state
    failures += 1;
    if (failures >= maxAttempts) throw new Error(`gave up after ${failures} broken streams`);
    const delayMs = Math.min(backoffMs, maxBackoffMs) + Math.random() * initialBackoffMs;
    await new Promise((wake) => setTimeout(wake, delayMs));
    backoffMs = Math.min(backoffMs * 2, maxBackoffMs);
  }
}

module.exports = { loadClient, watch, withKey };
