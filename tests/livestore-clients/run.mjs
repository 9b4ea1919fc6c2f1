// Real LiveStore 0.4 clients against a pgrelay server (event logs only, no
// PostgreSQL): three clients commit at the same moment and each ends with
// every event; a late client pulls the whole history; pgrelay restarts
// under a connected client that commits while it is down; two clients
// restarted on their own storage pull with a cursor and go on; a last
// client sees everything. Run by .ci/run; exits non-zero on failure.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createServer } from 'node:net'

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

const runClient = (url, name, dir, { commit = 0, expect, startAt = 0, hold, onReady: readyCallback }) =>
  new Promise((res) => {
    const holdArgs = hold
      ? ['--go-file', hold.goFile, '--commit-after', String(hold.commit), '--expect-after', String(hold.expect)]
      : []
    const child = spawn(
      process.execPath,
      [
        '--experimental-websocket', '--no-warnings',
        join(here, 'client.mjs'),
        '--url', url, '--store', storeId, '--client', name, '--dir', dir,
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

const adminInfo = async (port) => {
  const res = await fetch(`http://127.0.0.1:${port}/admin/stores/${storeId}`, {
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
} catch (e) {
  checks.failed++
  console.log(`not ok - ${e.stack ?? e}`)
} finally {
  if (server) await stopServer(server)
  rmSync(work, { recursive: true, force: true })
}

console.log(`livestore-clients: ${checks.passed} passed, ${checks.failed} failed`)
process.exit(checks.failed === 0 ? 0 : 1)
