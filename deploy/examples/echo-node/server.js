// The echo function in Node.js, written the way the platform docs show: a WebSocket server
// on 0.0.0.0, port $PORT (9000 when unset), that echoes every message back.
const WebSocket = require('ws');

const port = Number(process.env.PORT || 9000);
const wss = new WebSocket.Server({ host: '0.0.0.0', port });

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    ws.send(data, { binary: isBinary });
  });
});

wss.on('listening', () => {
  console.log(`echo function listening on 0.0.0.0:${port}`);
});

process.on('SIGTERM', () => wss.close(() => process.exit(0)));
