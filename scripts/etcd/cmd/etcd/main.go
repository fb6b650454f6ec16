// Command etcd: upstream's main.go of go.etcd.io/etcd/v3, built from the Go
// module go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
