// Package controllers stands in for sigs.k8s.io/mcs-api/controllers (see
// go.mod): the one name upstream Cilium uses, with the value MCS-API
// defines.
package controllers

// DerivedServiceAnnotation names the Service derived from a ServiceImport.
const DerivedServiceAnnotation = "multicluster.kubernetes.io/derived-service"
