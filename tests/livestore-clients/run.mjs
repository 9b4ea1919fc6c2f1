// Real LiveStore 0.4 clients against a pgrelay server (event logs only, no
// PostgreSQL): three clients commit at the same moment and each ends with
// every event; a late client pulls the whole history; pgrelay restarts
// under a connected client that commits while it is down; two clients
// restarted on their own storage pull with a cursor and go on; a last
// client sees everything. Then a 0.4 client over the HTTP transport and one
// over a WebSocket commit at the same moment and each ends with both's
// events; and two LiveStore 0.3 clients (v03/, /websocket), one behind a
// proxy that cuts its connection once: after it reconnects it still
// receives the other's events and its own push is accepted. Run by
// .ci/run; exits non-zero on failure.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { connect, createServer } from 'node:net'

const here = dirname(fileURLToPath(import.meta.url))
const bin = process.env.PGRELAY_BIN ?? resolve(here, '../../target/release/pgrelay')
const work = mkdtempSync(join(tmpdir(), 'pgrelay-livestore-'))
const storeId = `todos-${Date.now()}`
const adminToken = 'admin-token-for-the-test'
const checks = { passed: 0, failed: 0 }

const check = (ok, what) => {
  if (ok) {
    checks.passed++
    console.log(`ok - ${what}`)
  } else {
    checks.failed++
    console.log(`not ok - ${what}`)
  }
}

const freePort = () =>
  new Promise((res, rej) => {
    const srv = createServer()
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => res(port))
    })
    srv.on('error', rej)
  })

const startServer = (port) =>
  new Promise((res, rej) => {
    const child = spawn(
      bin,
      [
        'serve',
        '--listen', `127.0.0.1:${port}`,
        '--eventlog-db', join(work, 'events.sqlite'),
        '--eventlog-auth-token', 'insecure-token-change-me',
        '--admin-token', adminToken,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, PGRELAY_LOG: process.env.PGRELAY_LOG ?? 'warn' } },
    )
    child.on('error', rej)
    child.stdout.on('data', (chunk) => {
      if (chunk.toString().includes('pgrelay listening on')) res(child)
    })
    child.on('exit', (code) => rej(new Error(`pgrelay serve exited with ${code}`)))
  })

const stopServer = (child) =>
  new Promise((res) => {
    child.removeAllListeners('exit')
    child.on('exit', () => res())
    child.kill('SIGTERM')
  })

const runClient = (url, name, dir, { commit = 0, expect, startAt = 0, hold, onReady: readyCallback, transport = 'ws', store = storeId }) =>
  new Promise((res) => {
    const holdArgs = hold
      ? ['--go-file', hold.goFile, '--commit-after', String(hold.commit), '--expect-after', String(hold.expect)]
      : []
    const child = spawn(
      process.execPath,
      [
        '--experimental-websocket', '--no-warnings',
        join(here, 'client.mjs'),
        '--url', url, '--store', store, '--client', name, '--dir', dir, '--transport', transport,
        '--commit', String(commit), '--expect', String(expect), '--start-at', String(startAt),
        ...holdArgs,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    )
    let out = ''
    child.stdout.on('data', (chunk) => {
      out += chunk.toString()
      if (readyCallback && out.includes('READY ')) {
        readyCallback()
        readyCallback = undefined
      }
    })
    child.on('exit', (code) => {
      const line = out.split('\n').find((l) => l.startsWith('RESULT '))
      const result = line ? JSON.parse(line.slice(7)) : { client: name, count: -1, pending: -1, ids: [] }
      if (!line) console.log(out.slice(-4000))
      res({ ...result, code })
    })
  })

// A LiveStore 0.3 client (v03/client.mjs, its own node_modules).
const run03 = (url, name, dir, store, { commit = 0, expect = 0, beforeCommit = 0, expectAfter, goFile, exitFile, onReady }) =>
  new Promise((res) => {
    const opts = ['--commit', String(commit), '--expect', String(expect), '--before-commit', String(beforeCommit), '--expect-after', String(expectAfter)]
    if (goFile) opts.push('--go-file', goFile)
    if (exitFile) opts.push('--exit-file', exitFile)
    const child = spawn(
      process.execPath,
      ['--experimental-websocket', '--no-warnings', join(here, 'v03', 'client.mjs'),
        '--url', url, '--store', store, '--client', name, '--dir', dir, ...opts],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    )
    let out = ''
    child.stdout.on('data', (chunk) => {
      out += chunk.toString()
      if (onReady && out.includes('READY ')) {
        onReady()
        onReady = undefined
      }
    })
    child.on('exit', (code) => {
      const line = out.split('\n').find((l) => l.startsWith('RESULT '))
      const result = line ? JSON.parse(line.slice(7)) : { client: name, count: -1, ids: [] }
      if (!line) console.log(out.slice(-4000))
      res({ ...result, code })
    })
  })

// A TCP proxy to pgrelay that can cut every connection through it once;
// counts connections, notes when pgrelay has answered on each and when a
// 0.3 pull answer (`"context":"pull"`) went through.
const startCutProxy = (target) =>
  new Promise((res) => {
    const open = new Set()
    const state = { connections: 0, answered: 0, pulled: false }
    const proxy = createServer((client) => {
      state.connections++
      const upstream = connect(target, '127.0.0.1')
      let answered = false
      upstream.on('data', (data) => {
        if (data.includes('"context":"pull"')) state.pulled = true
        if (!answered) {
          answered = true
          state.answered++
        }
      })
      client.pipe(upstream)
      upstream.pipe(client)
      const pair = { client, upstream }
      open.add(pair)
      const end = () => {
        client.destroy()
        upstream.destroy()
        open.delete(pair)
      }
      client.on('error', end).on('close', end)
      upstream.on('error', end).on('close', end)
    })
    proxy.listen(0, '127.0.0.1', () =>
      res({
        port: proxy.address().port,
        state,
        cut: () => {
          for (const { client, upstream } of open) {
            client.destroy()
            upstream.destroy()
          }
        },
        close: () => proxy.close(),
      }),
    )
  })

const waitFor = async (what, condition, ms = 30000) => {
  const until = Date.now() + ms
  while (Date.now() < until) {
    if (await condition()) return true
    await new Promise((r) => setTimeout(r, 50))
  }
  console.log(`# timed out waiting for ${what}`)
  return false
}

const adminInfo = async (port, store = storeId) => {
  const res = await fetch(`http://127.0.0.1:${port}/admin/stores/${store}`, {
    headers: { authorization: `Bearer ${adminToken}` },
  })
  return res.json()
}

const sameIds = (results) => results.every((r) => JSON.stringify(r.ids) === JSON.stringify(results[0].ids))
const clientDir = (name) => join(work, name)

let server
try {
  const port = await freePort()
  const url = `ws://127.0.0.1:${port}/livestore`
  server = await startServer(port)

  // Phase 1: three clients commit at the same moment.
  const startAt = Date.now() + 4000
  const phase1 = await Promise.all(
    ['alice', 'bob', 'carol'].map((name) => runClient(url, name, clientDir(name), { commit: 5, expect: 15, startAt })),
  )
  for (const r of phase1) check(r.code === 0 && r.count === 15 && r.pending === 0, `${r.client} holds all 15 events, none pending (${r.count}, ${r.pending} pending)`)
  check(sameIds(phase1), 'the three clients hold the same events')

  // Phase 2: a late client on fresh storage pulls the whole history.
  const late = await runClient(url, 'dave', clientDir('dave'), { expect: 15 })
  check(late.code === 0 && late.count === 15 && sameIds([phase1[0], late]), `a late client pulls the whole history (${late.count})`)
  const before = await adminInfo(port)
  check(before.head === 15 && before.events === 15, `the server holds 15 events (head ${before.head})`)

  // Phase 3: pgrelay restarts under a connected client, which commits
  // while the server is down and pushes once it is back.
  const goFile = join(work, 'go')
  let ready
  const isReady = new Promise((r) => (ready = r))
  const frank = runClient(url, 'frank', clientDir('frank'), {
    commit: 2, expect: 17, hold: { goFile, commit: 2, expect: 19 }, onReady: () => ready(),
  })
  await isReady
  await stopServer(server)
  writeFileSync(goFile, 'go')
  await new Promise((r) => setTimeout(r, 1000))
  server = await startServer(port)
  const after = await adminInfo(port)
  check(after.backend_id === before.backend_id && after.head >= 17, `a restart keeps the log and the backend id (head ${after.head})`)
  const held = await frank
  check(held.code === 0 && held.count === 19 && held.pending === 0, `a client connected across the restart pushes what it committed offline (${held.count}, ${held.pending} pending)`)

  // Phase 4: two clients restarted on their own storage pull from their
  // cursor, commit at the same moment, and go on.
  const startAgain = Date.now() + 4000
  const phase4 = await Promise.all([
    runClient(url, 'alice', clientDir('alice'), { commit: 5, expect: 27, startAt: startAgain }),
    runClient(url, 'bob', clientDir('bob'), { commit: 3, expect: 27, startAt: startAgain }),
  ])
  for (const r of phase4) check(r.code === 0 && r.count === 27 && r.pending === 0, `restarted ${r.client} holds all 27 events, none pending (${r.count}, ${r.pending} pending)`)

  // A last client on fresh storage sees everything everyone committed.
  const last = await runClient(url, 'erin', clientDir('erin'), { expect: 27 })
  check(last.code === 0 && last.count === 27 && sameIds([...phase4, last]), `a new client sees all 27 events (${last.count})`)
  const final = await adminInfo(port)
  check(final.head === 27 && final.events === 27, `the server holds 27 events (head ${final.head})`)

  // Phase 5: the 0.4 HTTP transport (makeHttpSync) beside a WebSocket
  // client on one store: both commit at the same moment, both end with all.
  const httpStore = `todos-http-${Date.now()}`
  const startHttp = Date.now() + 4000
  const phase5 = await Promise.all([
    runClient(`http://127.0.0.1:${port}/livestore`, 'henry', clientDir('henry'), { commit: 4, expect: 7, startAt: startHttp, transport: 'http', store: httpStore }),
    runClient(url, 'wendy', clientDir('wendy'), { commit: 3, expect: 7, startAt: startHttp, store: httpStore }),
  ])
  for (const r of phase5) check(r.code === 0 && r.count === 7 && r.pending === 0, `${r.client} (${r === phase5[0] ? 'HTTP' : 'WebSocket'}) holds all 7 events, none pending (${r.count}, ${r.pending} pending)`)
  check(sameIds(phase5), 'the HTTP and the WebSocket client hold the same events')
  const httpInfo = await adminInfo(port, httpStore)
  check(httpInfo.head === 7, `the server holds the 7 events of both transports (head ${httpInfo.head})`)

  // Phase 6: LiveStore 0.3 (/websocket). alice03 connects through a proxy
  // that cuts her connection once; after she reconnects, bob03 commits 3
  // directly; alice03 must receive them (0.3 clients pull only once, so
  // only a broadcast reaches her), then commits 2 whose push must be
  // accepted; both end with all 5 and the server holds 5.
  const store03 = `todos03-${Date.now()}`
  const proxy = await startCutProxy(port)
  const go03 = join(work, 'go03')
  const exit03 = join(work, 'exit03')
  let alice03Ready
  const isAlice03Ready = new Promise((r) => (alice03Ready = r))
  const alice03 = run03(`http://127.0.0.1:${proxy.port}`, 'alice03', clientDir('alice03'), store03, {
    commit: 2, expect: 0, beforeCommit: 3, expectAfter: 5, goFile: go03, exitFile: exit03, onReady: () => alice03Ready(),
  })
  await isAlice03Ready
  // Cut once her pull is answered: a 0.3 client pulls once per client, and
  // one cut before that answer would leave it waiting for it for good,
  // with LiveStore's own 0.3 backend too.
  await waitFor('alice03 to pull', async () => proxy.state.pulled)
  proxy.cut()
  const reconnected = await waitFor('alice03 to reconnect', async () =>
    proxy.state.answered >= 2 && (await adminInfo(port, store03)).sockets === 1)
  check(reconnected && proxy.state.connections >= 2, `the 0.3 client reconnected after the cut (${proxy.state.connections} connections)`)
  const bob03 = run03(`http://127.0.0.1:${port}`, 'bob03', clientDir('bob03'), store03, {
    commit: 3, expect: 0, expectAfter: 5, exitFile: exit03,
  })
  await waitFor('bob03 to push', async () => (await adminInfo(port, store03)).head >= 3)
  writeFileSync(go03, 'go')
  const all03 = await waitFor('the server to hold 5 events', async () => (await adminInfo(port, store03)).head >= 5, 45000)
  writeFileSync(exit03, 'exit')
  const phase6 = await Promise.all([alice03, bob03])
  proxy.close()
  for (const r of phase6) check(r.code === 0 && r.count === 5, `0.3 ${r.client} holds all 5 events (${r.count})`)
  check(all03 && sameIds(phase6), 'the reconnected 0.3 client pushed its events and both hold the same')
} catch (e) {
  checks.failed++
  console.log(`not ok - ${e.stack ?? e}`)
} finally {
  if (server) await stopServer(server)
  rmSync(work, { recursive: true, force: true })
}

console.log(`livestore-clients: ${checks.passed} passed, ${checks.failed} failed`)
process.exit(checks.failed === 0 ? 0 : 1)
