module goplain

go 1.19
