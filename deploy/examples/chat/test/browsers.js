// Two users in a real browser: two headless Chromium pages load the chat page from URL,
// each sends a message, and each must see the other's. Prints one JSON line with the
// instance each page's WebSocket landed on; exits non-zero on any failure or after the
// deadline.
//
//   node test/browsers.js 'http://127.0.0.1:8080/chat?room=r1'
//
// Chromium is $CHROMIUM or /usr/bin/chromium (Debian's `chromium`).
const puppeteer = require('puppeteer-core');

const STEP_MS = 15000;
const DEADLINE_MS = 90000;

async function join(browser, url, name) {
  const page = await browser.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('console', (msg) => console.error(`[${name}] console: ${msg.text()}`));
  const target = new URL(url);
  target.searchParams.set('name', name);
  const response = await page.goto(target.href);
  if (!response.ok()) throw new Error(`${name}: GET ${target.href}: ${response.status()}`);
  // The server says "joined" once the room's channel is subscribed, and the page enables
  // its input then: a message typed before would not reach this page's instance.
  await page.waitForSelector('#text:not([disabled])');
  const instance = await page.$eval('#status', (el) => el.dataset.instance);
  return { page, name, instance };
}

async function say(user, text) {
  await user.page.type('#text', text);
  await user.page.keyboard.press('Enter');
}

async function sees(user, line) {
  try {
    await user.page.waitForFunction(
      (expected) => [...document.querySelectorAll('#log li')].some((li) => li.textContent === expected),
      {},
      line,
    );
  } catch (err) {
    const log = await user.page.$$eval('#log li', (lis) => lis.map((li) => li.textContent));
    throw new Error(`${user.name} did not see ${JSON.stringify(line)} (saw ${JSON.stringify(log)}): ${err.message}`);
  }
}

async function main(url) {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Chromium's own sandbox refuses to start as root, which is how the tests run.
    args: ['--no-sandbox'],
  });
  try {
    // One page at a time, so the first has its instance before the second asks for one.
    const ann = await join(browser, url, 'ann');
    const bob = await join(browser, url, 'bob');
    await say(ann, 'hello from ann');
    await say(bob, 'hello from bob');
    await sees(bob, 'ann: hello from ann');
    await sees(ann, 'bob: hello from bob');
    console.log(JSON.stringify({ ann: ann.instance, bob: bob.instance }));
  } finally {
    await browser.close();
  }
}

const url = process.argv[2];
if (!url) {
  console.error('usage: node test/browsers.js URL');
  process.exit(2);
}
setTimeout(() => {
  console.error(`browsers: not done within ${DEADLINE_MS} ms`);
  process.exit(1);
}, DEADLINE_MS);
main(url).then(
  () => process.exit(0),
  (err) => {
    console.error(`browsers: ${err.stack || err}`);
    process.exit(1);
  },
);
