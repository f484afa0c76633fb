// Runs a command line the way a user would, with sh, but with `curl` and
// `wsgateway` replaced by stubs that only write down their arguments: what
// the line would run, without running it. Also for the test files' hostile
// values: MARK names a file that any command injected through them touches
// (`touch$IFS$MARK`: no space, which a URL would encode).

import { execFile } from 'node:child_process';
import assert from 'node:assert/strict';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Values that each would run `touch $MARK` if read as shell text. */
export const HOSTILE = [
  ';touch$IFS$MARK;',
  '$(touch$IFS$MARK)',
  '`touch$IFS$MARK`',
  "'; touch \"$MARK\"; '",
  "'\\''$(touch $MARK)'\\''",
  '"$(touch $MARK)"',
  'x\ntouch "$MARK"\n',
  '\\\'; touch $MARK #',
  '&& touch $MARK || touch $MARK | touch $MARK &',
  '> $MARK',
  '{a,b} [1-2] * ? ~ !! $HOME ${MARK} $((1+1))',
  '',
  ' ',
  "'",
  "''",
  '-d',
  'unicode: é ✓ 🚀 \u2028',
];

// Each call appends: its name, its argument count, its arguments, each
// ended by a NUL (arguments may hold newlines, never a NUL).
const STUB = `#!/bin/sh
{ printf '%s\\0%s\\0' "\${0##*/}" "$#"; for a in "$@"; do printf '%s\\0' "$a"; done; } >>"$STUB_LOG"
`;

/** A directory with the stubs; `run(line)` runs a line with sh, the stubs first on PATH. */
export async function shellStubs() {
  const dir = await mkdtemp(join(tmpdir(), 'wsgateway-shell-'));
  const bin = join(dir, 'bin');
  const log = join(dir, 'calls');
  const mark = join(dir, 'injected');
  await mkdir(bin);
  for (const name of ['curl', 'wsgateway']) {
    await writeFile(join(bin, name), STUB);
    await chmod(join(bin, name), 0o755);
  }

  /**
   * Runs `line` with `sh -c`; answers the stubs' calls ({ name, argv }),
   * sh's exit code and stderr, and whether the marker file was made.
   */
  async function run(line, env = {}) {
    await rm(log, { force: true });
    await rm(mark, { force: true });
    const { code, stderr } = await new Promise((resolve) => {
      execFile('sh', ['-c', line], {
        cwd: dir,
        env: { ...process.env, ...env, PATH: `${bin}:${process.env.PATH}`, STUB_LOG: log, MARK: mark },
      }, (error, _stdout, stderr) => resolve({ code: error ? error.code ?? error.signal : 0, stderr }));
    });
    const fields = existsSync(log) ? (await readFile(log, 'utf8')).split('\0').slice(0, -1) : [];
    const calls = [];
    while (fields.length) {
      const name = fields.shift();
      const argc = Number(fields.shift());
      calls.push({ name, argv: fields.splice(0, argc) });
    }
    return { calls, code, stderr, injected: existsSync(mark) };
  }

  /**
   * Asserts that sh, given `line`, runs exactly one command, `name` with
   * exactly `argv` (a function in `argv` checks its argument instead),
   * cleanly, and nothing else: no other stub call, no marker file.
   */
  async function assertRuns(line, name, argv, env = {}) {
    const { calls, code, stderr, injected } = await run(line, env);
    const what = `sh -c ${JSON.stringify(line)}`;
    assert.equal(injected, false, `${what} ran an injected command`);
    assert.equal(calls.length, 1, `${what} made ${calls.length} stub calls: ${JSON.stringify(calls)} (stderr: ${stderr})`);
    assert.equal(calls[0].name, name, what);
    assert.equal(calls[0].argv.length, argv.length, `${what} passed ${JSON.stringify(calls[0].argv)}`);
    argv.forEach((want, i) => {
      if (typeof want === 'function') want(calls[0].argv[i]);
      else assert.equal(calls[0].argv[i], want, `${what}: argument ${i + 1}`);
    });
    assert.equal(stderr, '', what);
    assert.equal(code, 0, what);
  }

  return { run, assertRuns, close: () => rm(dir, { recursive: true, force: true }) };
}
