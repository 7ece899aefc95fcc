module reloader.test/goserver

go 1.19
