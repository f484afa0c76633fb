// The demo page's shell quoting on its own, in Node, without a browser: the
// part of src/http/demo/page.html between its "BEGIN shell words" and "END
// shell words" lines is run here, and every command line it builds from a
// hostile value is run by sh, with stubs for curl and wsgateway
// (shell_stub.mjs): exactly one call, exactly the values as arguments.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { HOSTILE, shellStubs } from './shell_stub.mjs';

const PAGE = readFileSync(new URL('../../src/http/demo/page.html', import.meta.url), 'utf8');

function shellWords() {
  const m = PAGE.match(/\/\/ BEGIN shell words.*\n([\s\S]*?)\n\/\/ END shell words\n/);
  assert.ok(m, 'page.html has no "BEGIN shell words" ... "END shell words" part');
  return new Function(`${m[1]}\nreturn { sh, ShellText, UnsafeValue };`)();
}

test('each value is one word, as it is; the template text is the shell\'s', async (t) => {
  const { sh, ShellText } = shellWords();
  const stubs = await shellStubs();
  t.after(() => stubs.close());
  // Every printable ASCII character, and every pair of the special ones.
  const ascii = Array.from({ length: 95 }, (_, i) => String.fromCharCode(32 + i)).join('');
  const special = ' !"#$&\'()*;<>?[\\]`{|}~\n';
  const pairs = [...special].flatMap((a) => [...special].map((b) => a + b)).join('|');
  for (const v of [...HOSTILE, ascii, pairs]) {
    await stubs.assertRuns(sh`curl -sS ${v} -H ${v}x${v}`, 'curl', ['-sS', v, '-H', `${v}x${v}`]);
  }
  const json = JSON.stringify({ channel: HOSTILE[0], event: { type: HOSTILE[3], id: HOSTILE[6] } });
  await stubs.assertRuns(sh`wsgateway publish --event ${json}`, 'wsgateway', ['publish', '--event', json]);
  // ShellText is left to the shell: an environment variable, expanded once.
  const key = HOSTILE.join('');
  await stubs.assertRuns(sh`wsgateway --api-key ${new ShellText('"$WSGATEWAY_API_KEY"')}`, 'wsgateway', ['--api-key', key], { WSGATEWAY_API_KEY: key });
});

test('a value with a control or invisible character other than a newline is refused', () => {
  const { sh, UnsafeValue } = shellWords();
  for (const v of ['\t', 'a\rb', '\x00', '\x03', 'x\x15touch $MARK\n', '\x1b[201~', '\x7f', '\x9b', '\u200b', '\u202e', '\u2066', '\ufeff']) {
    assert.throws(() => sh`curl ${v}`, UnsafeValue, JSON.stringify(v));
  }
  assert.equal(sh`curl ${'a\nb'}`, "curl 'a\nb'");
  assert.equal(sh`curl ${"it's"} -d ${7}`, "curl 'it'\\''s' -d '7'");
});
