'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { activePollers, apiKey, client, createExecution, example, waitFor } = require('./support');

test('a full watch ends OK right after the final state, revisions increasing', async () => {
  const stub = client();
  const id = await createExecution([
    { id: 'a', simulate: { durationMs: 300 } },
    { id: 'b', simulate: { durationMs: 300 }, dependsOn: ['a'] },
  ]);
  const responses = [];
  const status = await new Promise((resolve, reject) => {
    const call = stub.WatchExecution({ executionId: id }, example.withKey(apiKey));
    call.on('data', (response) => responses.push(response));
    call.on('error', reject);
    call.on('status', resolve);
  });
  assert.equal(status.code, grpc.status.OK);
  const revisions = responses.filter((r) => !r.heartbeat).map((r) => BigInt(r.execution.revision));
  for (let i = 1; i < revisions.length; i += 1) assert.ok(revisions[i] > revisions[i - 1], `${revisions}`);
  assert.equal(responses.at(-1).execution.state, 'EXECUTION_STATE_COMPLETED');
  stub.close();
});

test('the watch example follows an execution to its end', async () => {
  const stub = client();
  const id = await createExecution([{ id: 'sync', type: 'lipSync', simulate: { durationMs: 200, fail: 'no face' } }]);
  const seen = [];
  const final = await example.watch(stub, id, { apiKey, onMessage: (r) => seen.push(r) });
  assert.equal(final.state, 'EXECUTION_STATE_FAILED');
  assert.match(final.error, /no face/);
  assert.deepEqual(seen.at(-1).execution, final);
  stub.close();
});

test('a watch cancelled midway ends CANCELLED and frees the gateway poller', async () => {
  const stub = client();
  await waitFor(async () => (await activePollers()) === 0, 'earlier pollers to stop');
  const id = await createExecution([{ id: 'long', simulate: { durationMs: 600000 } }]);
  const call = stub.WatchExecution({ executionId: id }, example.withKey(apiKey));
  const error = await new Promise((resolve, reject) => {
    call.once('data', async (first) => {
      try {
        assert.equal(first.execution.id, id);
        assert.equal(await activePollers(), 1, 'the watch has its poller');
        call.cancel();
      } catch (failure) {
        reject(failure);
      }
    });
    call.on('error', resolve);
    call.on('status', (status) => status.code === grpc.status.OK && reject(new Error('ended OK')));
  });
  assert.equal(error.code, grpc.status.CANCELLED);
  // Still connected (the channel is open): the gateway must notice the cancel, drop
  // the watcher and stop the poller after its linger.
  await waitFor(async () => (await activePollers()) === 0, 'the poller to stop after the cancel');
  stub.close();
});
