// The app every test client runs: todos created by events.
import { Events, makeSchema, Schema, State } from '@livestore/livestore'

export const todos = State.SQLite.table({
  name: 'todos',
  columns: {
    id: State.SQLite.text({ primaryKey: true }),
    text: State.SQLite.text({ default: '' }),
    client: State.SQLite.text({ default: '' }),
  },
})

export const events = {
  todoCreated: Events.synced({
    name: 'v1.TodoCreated',
    schema: Schema.Struct({ id: Schema.String, text: Schema.String, client: Schema.String }),
  }),
}

const materializers = State.SQLite.materializers(events, {
  'v1.TodoCreated': ({ id, text, client }) => todos.insert({ id, text, client }),
})

const state = State.SQLite.makeState({ tables: { todos }, materializers })

export const schema = makeSchema({ events, state })
