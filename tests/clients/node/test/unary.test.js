'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { apiKey, client, createExecution, example, waitFor } = require('./support');

function get(stub, executionId, metadata = example.withKey(apiKey)) {
  return new Promise((resolve, reject) =>
    stub.GetExecutionStatus({ executionId }, metadata, (error, response) =>
      error ? reject(error) : resolve(response.execution),
    ),
  );
}

test('GetExecutionStatus returns a completed execution', async () => {
  const stub = client();
  const id = await createExecution([{ id: 'poster', type: 'generateImage', simulate: { durationMs: 10 } }]);
  const execution = await waitFor(async () => {
    const seen = await get(stub, id);
    return seen.state === 'EXECUTION_STATE_COMPLETED' && seen;
  }, 'completion');
  assert.equal(execution.id, id);
  assert.equal(execution.upstreamStatus, 'completed');
  assert.equal(execution.progress.progress, 100);
  assert.match(execution.result.url, /^https:\/\//);
  assert.ok(BigInt(execution.revision) > 0n);
  stub.close();
});

test('GetExecutionStatus of an unknown execution is NOT_FOUND', async () => {
  const stub = client();
  await assert.rejects(get(stub, 'exec_unknown_to_synthome'), (error) => {
    assert.equal(error.code, grpc.status.NOT_FOUND);
    return true;
  });
  stub.close();
});
