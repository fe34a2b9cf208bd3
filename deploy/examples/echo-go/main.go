// The echo function in Go, written the way the platform docs show: one HTTP server on
// 0.0.0.0, port $PORT (9000 when unset). A WebSocket upgrade echoes every message back; a
// plain request on the same route gets a short text answer.
package main

import (
	"context"
	"errors"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/gorilla/websocket"
)

var upgrader = websocket.Upgrader{
	// wsedge checks Origin against the function's allowed_origins before the upgrade
	// reaches us; gorilla's same-host check would refuse every browser page, since the
	// Host it sees is the instance's, not the one the browser dialed.
	CheckOrigin: func(*http.Request) bool { return true },
}

func handle(w http.ResponseWriter, r *http.Request) {
	if !websocket.IsWebSocketUpgrade(r) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("echo-go: open a WebSocket on this URL and every message comes back\n"))
		return
	}
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade has already answered with the error status.
	}
	defer conn.Close()
	// gorilla's default handlers answer pings with pongs and echo the client's close code,
	// which is all the protocol side an echo needs.
	for {
		kind, data, err := conn.ReadMessage()
		if err != nil {
			return
		}
		if err := conn.WriteMessage(kind, data); err != nil {
			return
		}
	}
}

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "9000"
	}
	srv := &http.Server{Addr: "0.0.0.0:" + port, Handler: http.HandlerFunc(handle)}

	// wsedge stops an idle instance with SIGTERM: stop accepting and let the process end.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		_ = srv.Shutdown(context.Background())
	}()

	log.Printf("echo function listening on %s", srv.Addr)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}
