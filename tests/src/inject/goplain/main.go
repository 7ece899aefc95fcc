// Go net/http as most programs listen: http.Server.ListenAndServe (no
// ListenConfig, so no SO_REUSEPORT); ":PORT" is the IPv6 wildcard,
// dual-stack. Graceful Shutdown on SIGTERM. Answers gen=N pid=P.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	addr := flag.String("listen", ":8080", "address")
	flag.Parse()
	generation := os.Getenv("RELOADER_GENERATION")
	server := &http.Server{Addr: *addr, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "gen=%s pid=%d\n", generation, os.Getpid())
	})}
	done := make(chan struct{})
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM)
		<-stop
		server.Shutdown(context.Background())
		close(done)
	}()
	if err := server.ListenAndServe(); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	<-done
}
