// One real LiveStore 0.3 client (adapter-node, fs storage, sync-cf 0.3's
// makeCfSync, which opens BASE/websocket) as its own process: waits until
// it holds --expect todos, prints READY, waits for --go-file, commits
// --commit todos, then waits until it holds --expect-after todos and prints
// one RESULT line (with --before-commit, it first waits to hold that many). (0.3 has no sync-state query; run.mjs asks the server
// whether the pushes arrived.)
import { existsSync } from 'node:fs'
import { parseArgs } from 'node:util'

import { makeAdapter } from '@livestore/adapter-node'
import { createStorePromise, Events, makeSchema, queryDb, Schema, State } from '@livestore/livestore'
import { makeCfSync } from '@livestore/sync-cf'

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    store: { type: 'string' },
    client: { type: 'string' },
    dir: { type: 'string' },
    expect: { type: 'string', default: '0' },
    'go-file': { type: 'string' },
    commit: { type: 'string', default: '0' },
    // After the go file: wait until holding this many todos, then commit.
    'before-commit': { type: 'string', default: '0' },
    'expect-after': { type: 'string' },
    // Stay up (and keep pushing) until this file exists: run.mjs writes it
    // once the server holds every event.
    'exit-file': { type: 'string' },
    token: { type: 'string', default: 'insecure-token-change-me' },
    timeout: { type: 'string', default: '60000' },
  },
})

const todos = State.SQLite.table({
  name: 'todos',
  columns: {
    id: State.SQLite.text({ primaryKey: true }),
    text: State.SQLite.text({ default: '' }),
    client: State.SQLite.text({ default: '' }),
  },
})
const events = {
  todoCreated: Events.synced({
    name: 'v1.TodoCreated',
    schema: Schema.Struct({ id: Schema.String, text: Schema.String, client: Schema.String }),
  }),
}
const materializers = State.SQLite.materializers(events, {
  'v1.TodoCreated': ({ id, text, client }) => todos.insert({ id, text, client }),
})
const schema = makeSchema({ events, state: State.SQLite.makeState({ tables: { todos }, materializers }) })

const deadline = Date.now() + Number(args.timeout)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const adapter = makeAdapter({
  storage: { type: 'fs', baseDirectory: args.dir },
  clientId: args.client,
  sessionId: `${args.client}-session`,
  sync: { backend: makeCfSync({ url: args.url }) },
})
const store = await createStorePromise({ adapter, schema, storeId: args.store, syncPayload: { authToken: args.token } })

const allTodos = queryDb(todos.select())
let rows = []
const settle = async (expected) => {
  while (Date.now() < deadline) {
    rows = store.query(allTodos)
    if (rows.length >= expected) return
    await sleep(100)
  }
}

await settle(Number(args.expect))
console.log(`READY ${rows.length}`)
if (args['go-file']) {
  while (!existsSync(args['go-file']) && Date.now() < deadline) await sleep(50)
}
await settle(Number(args['before-commit']))
const run = `${args.client}-${Date.now()}`
for (let i = 0; i < Number(args.commit); i++) {
  store.commit(events.todoCreated({ id: `${run}-${i}`, text: `todo ${i} from ${args.client}`, client: args.client }))
}
const expected = Number(args['expect-after'] ?? args.expect)
await settle(expected)
console.log(`RESULT ${JSON.stringify({ client: args.client, count: rows.length, pending: 0, ids: rows.map((r) => r.id).sort() })}`)
if (args['exit-file']) {
  while (!existsSync(args['exit-file']) && Date.now() < deadline) await sleep(50)
}
await store.shutdown()
process.exit(rows.length === expected ? 0 : 1)
