// One real LiveStore client (adapter-node, fs storage, sync-cf's makeWsSync,
// or makeHttpSync with --transport http)
// as its own process: commits --commit todos at --start-at, then waits until
// it holds --expect todos and nothing of its own is left unpushed, and
// prints one JSON line with what it holds.
import { parseArgs } from 'node:util'

import { makeAdapter } from '@livestore/adapter-node'
import { createStorePromise, queryDb } from '@livestore/livestore'
import { makeHttpSync, makeWsSync } from '@livestore/sync-cf/client'

import { events, schema, todos } from './schema.mjs'

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    store: { type: 'string' },
    client: { type: 'string' },
    dir: { type: 'string' },
    commit: { type: 'string', default: '0' },
    expect: { type: 'string' },
    'start-at': { type: 'string', default: '0' },
    token: { type: 'string', default: 'insecure-token-change-me' },
    // `ws` (makeWsSync) or `http` (makeHttpSync: push and pull over plain
    // HTTP requests, live updates by polling).
    transport: { type: 'string', default: 'ws' },
    timeout: { type: 'string', default: '60000' },
    // Stay running: after the first --expect, print READY, wait for this
    // file, commit --commit-after more, then wait for --expect-after.
    'go-file': { type: 'string' },
    'commit-after': { type: 'string', default: '0' },
    'expect-after': { type: 'string' },
  },
})

const deadline = Date.now() + Number(args.timeout)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const adapter = makeAdapter({
  storage: { type: 'fs', baseDirectory: args.dir },
  clientId: args.client,
  sessionId: `${args.client}-session`,
  sync: {
    backend:
      args.transport === 'http'
        ? makeHttpSync({ url: args.url, livePull: { pollInterval: 300 } })
        : makeWsSync({ url: args.url }),
  },
})

const store = await createStorePromise({
  adapter,
  schema,
  storeId: args.store,
  syncPayload: { authToken: args.token },
})

const startAt = Number(args['start-at'])
if (startAt > Date.now()) await sleep(startAt - Date.now())

const run = `${args.client}-${Date.now()}`
for (let i = 0; i < Number(args.commit); i++) {
  store.commit(events.todoCreated({ id: `${run}-${i}`, text: `todo ${i} from ${args.client}`, client: args.client }))
}

const allTodos = queryDb(todos.select())
let rows = []
let pending = -1
const settle = async (expected) => {
  while (Date.now() < deadline) {
    rows = store.query(allTodos)
    const states = await store._dev.syncStates()
    pending = states.leader.pending.length + states.session.pending.length
    if (rows.length >= expected && pending === 0) return
    await sleep(100)
  }
}

let expected = Number(args.expect)
await settle(expected)
if (args['go-file']) {
  console.log(`READY ${rows.length}`)
  const { existsSync } = await import('node:fs')
  while (!existsSync(args['go-file']) && Date.now() < deadline) await sleep(50)
  for (let i = 0; i < Number(args['commit-after']); i++) {
    store.commit(events.todoCreated({ id: `${run}-after-${i}`, text: `todo after ${i}`, client: args.client }))
  }
  expected = Number(args['expect-after'])
  await settle(expected)
}

const result = {
  client: args.client,
  count: rows.length,
  pending,
  ids: rows.map((r) => r.id).sort(),
}
console.log(`RESULT ${JSON.stringify(result)}`)
await store.shutdownPromise()
process.exit(rows.length === expected && pending === 0 ? 0 : 1)
