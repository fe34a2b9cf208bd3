// A chat room function, the way the platform docs advise: one port serves the page over
// HTTP and the messages over WebSocket, and rooms are shared across instances through Redis
// pub/sub (one channel per room), since each instance only knows its own connections.
const fs = require('fs');
const http = require('http');
const path = require('path');
const { WebSocketServer } = require('ws');
const { createClient } = require('redis');

const port = Number(process.env.PORT || 9000);
const instance = process.env.WSEDGE_INSTANCE || 'local';
const page = fs.readFileSync(path.join(__dirname, 'chat.html'));

const ROOM = /^[A-Za-z0-9_-]{1,64}$/;
const MAX_TEXT = 2000;

if (!process.env.REDIS_URL) {
  console.error('chat: set REDIS_URL (redis://HOST:PORT); without Redis rooms cannot span instances');
  process.exit(1);
}
// A client in subscriber mode can run no other command, so publishing needs its own.
const publisher = createClient({ url: process.env.REDIS_URL });
const subscriber = publisher.duplicate();
for (const client of [publisher, subscriber]) {
  client.on('error', (err) => console.error(`redis: ${err.message}`));
}

// room -> this instance's sockets in it; the room's channel is subscribed while non-empty.
const rooms = new Map();

async function join(room, ws) {
  let members = rooms.get(room);
  if (!members) {
    members = new Set();
    rooms.set(room, members);
    await subscriber.subscribe(channel(room), (message) => {
      for (const member of rooms.get(room) || []) member.send(message);
    });
  }
  members.add(ws);
}

async function leave(room, ws) {
  const members = rooms.get(room);
  members.delete(ws);
  if (members.size === 0) {
    rooms.delete(room);
    await subscriber.unsubscribe(channel(room));
  }
}

function channel(room) {
  return `chat:${room}`;
}

const server = http.createServer((req, res) => {
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { Allow: 'GET, HEAD' }).end();
    return;
  }
  res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
  res.end(req.method === 'HEAD' ? undefined : page);
});

const wss = new WebSocketServer({ server, maxPayload: 64 * 1024 });

wss.on('connection', async (ws, req) => {
  const query = new URL(req.url, 'http://chat').searchParams;
  const room = query.get('room') || '';
  const name = (query.get('name') || 'guest').slice(0, 32);
  if (!ROOM.test(room)) {
    ws.close(1008, 'room: 1-64 letters, digits, - or _');
    return;
  }
  // Read nothing until the room's channel is subscribed: a message sent before then would
  // have no handler yet, and this socket would miss the room's traffic.
  ws.pause();
  try {
    await join(room, ws);
  } catch (err) {
    console.error(`joining ${room}: ${err.message}`);
    ws.close(1011, 'the room is unavailable');
    return;
  }
  if (ws.readyState !== ws.OPEN) {
    await leave(room, ws);
    return;
  }
  ws.on('close', () => leave(room, ws).catch((err) => console.error(err)));
  ws.on('message', (data, isBinary) => {
    const text = data.toString();
    if (isBinary || text.length === 0 || text.length > MAX_TEXT) return;
    const message = JSON.stringify({ name, text, instance });
    publisher.publish(channel(room), message).catch((err) => console.error(err));
  });
  ws.send(JSON.stringify({ joined: room, instance }));
  ws.resume();
});

async function main() {
  // Connect before listening: wsedge routes to an instance once it listens, and a chat
  // without Redis would silently keep every room to one instance.
  await Promise.all([publisher.connect(), subscriber.connect()]);
  server.listen(port, '0.0.0.0', () => {
    console.log(`chat function ${instance} listening on 0.0.0.0:${port}`);
  });
}

// wsedge has closed every WebSocket (1001) before it stops an instance, and Redis drops a
// client's subscriptions when its connection ends: nothing is left to flush.
process.on('SIGTERM', () => process.exit(0));

main().catch((err) => {
  console.error(`chat: ${err.message}`);
  process.exit(1);
});
