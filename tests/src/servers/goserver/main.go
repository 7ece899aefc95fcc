// A plain net/http server as a Go user would write one for reloader:
// SO_REUSEPORT set in ListenConfig.Control (before bind), graceful
// http.Server.Shutdown on SIGTERM. Answers gen=N pid=P.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// soReusePort is SO_REUSEPORT on Linux: Go 1.19's syscall package does not
// name it (golang.org/x/sys/unix does; this server has no dependencies).
const soReusePort = 0xf

func main() {
	addr := flag.String("listen", "127.0.0.1:8080", "address to listen on")
	flag.Parse()

	config := net.ListenConfig{
		Control: func(network, address string, conn syscall.RawConn) error {
			var err error
			if cerr := conn.Control(func(fd uintptr) {
				err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1)
			}); cerr != nil {
				return cerr
			}
			return err
		},
	}
	listener, err := config.Listen(context.Background(), "tcp", *addr)
	if err != nil {
		log.Fatalf("listen %s: %v", *addr, err)
	}

	generation := os.Getenv("RELOADER_GENERATION")
	pid := os.Getpid()
	server := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintf(w, "gen=%s pid=%d\n", generation, pid)
		}),
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()

	select {
	case err := <-served:
		log.Fatalf("serve: %v", err)
	case <-stop:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := server.Shutdown(ctx); err != nil {
		log.Fatalf("shutdown: %v", err)
	}
}
