// Command etcdctl: upstream's etcdctl/main.go, built from the Go module
// go.etcd.io/etcd/etcdctl/v3.
package main

import (
	"go.etcd.io/etcd/etcdctl/v3/ctlv3"
)

func main() {
	ctlv3.MustStart()
}
