// A stand-in for sigs.k8s.io/mcs-api/controllers, which the Go module proxy
// refuses in every version (403): upstream Cilium's operator imports it for
// one constant (its MCS-API support, off in every benchmark here).
module sigs.k8s.io/mcs-api/controllers

go 1.26.0
