// Command policy-oracle asks UPSTREAM Cilium's own policy engine
// (github.com/cilium/cilium v1.20.2, package pkg/policy) for policy verdicts,
// so that our Rust policy engine can be tested differentially against it.
//
// TEST-ONLY. It is never shipped and never runs in a cluster. It is built by
// scripts/build-oracle.sh into the cache directory and linked as
// .tools/bin/policy-oracle. Only this wrapper is ours; upstream's code comes
// from the Go module cache and is never committed.
//
// Protocol: one JSON document on stdin, one JSON document on stdout (with
// --stream: documents one after another until stdin ends, one output line
// each).
//
//	input:
//	{
//	  "cluster_name": "default",            // optional, default "default"
//	  "ipv4": true, "ipv6": true,           // optional, default true; sets option.Config.EnableIPv4/6
//	  "enable_node_selector_labels": false, // optional; sets option.Config.EnableNodeSelectorLabels
//	  "identities": [
//	    {"id": 1001, "labels": ["k8s:app=foo", "k8s:io.kubernetes.pod.namespace=default", ...]},
//	    {"id": 16777217, "cidr": "10.0.0.0/8"}   // labels = upstream labels.GetCIDRLabels(prefix)
//	  ],
//	  "policies": [ <full Kubernetes object: CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
//	                 (cilium.io/v2) or NetworkPolicy (networking.k8s.io/v1)> ],
//	  "named_ports": { "1001": [{"name": "http", "port": 80, "protocol": "TCP"}] },
//	  "queries": [ {"subject": 1001, "direction": "ingress", "peer": 1002, "proto": 6, "port": 80} ]
//	}
//
//	output:
//	{
//	  "verdicts": ["allow", "deny", ...],      // one per query
//	  "enforced": [true, false, ...],          // one per query: policy enforced in that direction for the subject
//	  "errors": [{"policy": 0, "error": "..."}],  // policies upstream rejected (skipped, the rest still apply)
//	  "reserved": [{"id": 1, "labels": ["reserved:host"]}, ...],  // reserved identities the oracle added
//	  "identity_labels": {"16777217": ["cidr:10.0.0.0/8", "reserved:world-ipv4"]}  // labels of the input identities
//	}
//
// Malformed input (bad JSON, unknown field, unknown policy kind, unknown query
// identity, ...) exits with status 1 and a one-line message on stderr. stdout
// only ever carries the result document. Upstream's logs go to stderr and are
// off unless POLICY_ORACLE_LOG=debug|info|warn|error is set.
//
// What is upstream's and what is ours:
//   - Identities: upstream's reserved identities (identity.ListReservedIdentities,
//     IDs 1..14 incl. the 1.20 aggregate identities 11..14) are always present
//     unless the input redefines the same ID. Label strings are parsed with
//     labels.NewLabelsFromModel; "cidr" identities get labels.GetCIDRLabels,
//     exactly the labels the policy importer hands to the ipcache for a policy
//     CIDR (cidr label + reserved:world / world-ipv4 / world-ipv6 by family and
//     the ipv4/ipv6 flags).
//   - Policies are parsed as the agent's policy watcher does (pkg/policy/k8s):
//     CNP/CCNP with .Parse(logger, clusterName) (which runs Sanitize) and
//     policyutils.RulesToPolicyEntries; NetworkPolicy with k8s.ParseNetworkPolicy.
//     Each policy is its own resource in repo.ReplaceByResource. The API
//     server's CRD schema validation is NOT applied here (only what the agent does).
//   - Named ports: ingress named ports resolve from the subject's own ports
//     (PolicyOwner.GetIngressNamedPort -> NamedPortMap.GetNamedPort, as
//     endpoint.GetIngressNamedPort does). Egress named ports resolve through the
//     repository's NamedPortsGetter, fed with a types.NamedPortMultiMap holding
//     every identity's ports (what the ipcache builds from all pods' container
//     ports, keyed by the pod's identity).
//   - Verdicts: resolve + distill once per subject (ComputeSelectorPolicy,
//     DistillPolicy with a fallback proxy redirect as upstream's LookupFlow does)
//     and EndpointPolicy.Lookup(key), upstream's user-space model of the bpf
//     datapath lookup incl. identity aggregates. "allow" iff the entry IsAllow().
//   - ICMP: the key's port field carries the ICMP type (the datapath puts the
//     type in the dport of the policy key, code ignored), so give the type in
//     "port"; type 0 is looked up as exact port 0 (full 16-bit prefix) as the
//     datapath does. (Upstream quirk, reproduced: a RULE on ICMP type 0 becomes
//     port "0", i.e. a wildcard over all ICMP types of that family.)
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"

	sigsjson "sigs.k8s.io/json"

	"github.com/cilium/cilium/pkg/crypto/certificatemanager"
	"github.com/cilium/cilium/pkg/endpoint/regeneration"
	envoypolicy "github.com/cilium/cilium/pkg/envoy/policy"
	"github.com/cilium/cilium/pkg/identity"
	"github.com/cilium/cilium/pkg/identity/identitymanager"
	ipcachetypes "github.com/cilium/cilium/pkg/ipcache/types"
	"github.com/cilium/cilium/pkg/k8s"
	ciliumv2 "github.com/cilium/cilium/pkg/k8s/apis/cilium.io/v2"
	slimnetv1 "github.com/cilium/cilium/pkg/k8s/slim/k8s/api/networking/v1"
	"github.com/cilium/cilium/pkg/labels"
	"github.com/cilium/cilium/pkg/option"
	"github.com/cilium/cilium/pkg/policy"
	policyapi "github.com/cilium/cilium/pkg/policy/api"
	policytypes "github.com/cilium/cilium/pkg/policy/types"
	policyutils "github.com/cilium/cilium/pkg/policy/utils"
	testcertificatemanager "github.com/cilium/cilium/pkg/testutils/certificatemanager"
	testpolicy "github.com/cilium/cilium/pkg/testutils/policy"
	ciliumtypes "github.com/cilium/cilium/pkg/types"
	"github.com/cilium/cilium/pkg/u8proto"
)

// ---------------------------------------------------------------- protocol types

type input struct {
	ClusterName string `json:"cluster_name"`
	IPv4        *bool  `json:"ipv4"`
	IPv6        *bool  `json:"ipv6"`
	// enable-node-selector-labels: fromNodes/toNodes are accepted.
	NodeSelectorLabels bool                        `json:"enable_node_selector_labels"`
	Identities         []inputIdentity             `json:"identities"`
	Policies           []json.RawMessage           `json:"policies"`
	NamedPorts         map[string][]inputNamedPort `json:"named_ports"`
	Queries            []inputQuery                `json:"queries"`
}

type inputIdentity struct {
	ID     uint32   `json:"id"`
	Labels []string `json:"labels"`
	CIDR   string   `json:"cidr"`
}

type inputNamedPort struct {
	Name     string `json:"name"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol"`
}

type inputQuery struct {
	Subject   uint32 `json:"subject"`
	Direction string `json:"direction"`
	Peer      uint32 `json:"peer"`
	Proto     int    `json:"proto"`
	Port      int    `json:"port"`
}

type output struct {
	Verdicts       []string            `json:"verdicts"`
	Enforced       []bool              `json:"enforced"`
	Errors         []policyError       `json:"errors"`
	Reserved       []reservedIdentity  `json:"reserved"`
	IdentityLabels map[string][]string `json:"identity_labels"`
}

type policyError struct {
	Policy int    `json:"policy"`
	Error  string `json:"error"`
}

type reservedIdentity struct {
	ID     uint32   `json:"id"`
	Labels []string `json:"labels"`
}

// ---------------------------------------------------------------- upstream glue

// owner is our PolicyOwner (upstream's stand-in for an Endpoint): it only
// answers ingress named ports from the subject's own container ports.
type owner struct {
	id    identity.NumericIdentity
	ports ciliumtypes.NamedPortMap
	log   *slog.Logger
}

func (o *owner) GetID() uint64 { return uint64(o.id) }

func (o *owner) GetIngressNamedPort(name string, proto u8proto.U8proto) uint16 {
	port, _ := o.ports.GetNamedPort(name, proto) // 0 when unknown, as the endpoint does
	return port
}

func (o *owner) PolicyDebug(msg string, attrs ...any) { o.log.Debug(msg, attrs...) }
func (o *owner) IsHost() bool                         { return o.id == identity.ReservedIdentityHost }

func (o *owner) PreviousMapStateSizes() policy.MapStateSizes { return policy.MapStateSizes{} }

func (o *owner) RegenerateIfAlive(*regeneration.ExternalRegenerationMetadata) <-chan bool {
	ch := make(chan bool)
	close(ch)
	return ch
}

// namedPorts is the repository's NamedPortsGetter (the ipcache's role upstream).
type namedPorts struct{ m ciliumtypes.NamedPortMultiMap }

func (n namedPorts) GetNamedPorts() ciliumtypes.NamedPortMultiMap { return n.m }

// ---------------------------------------------------------------- main

func main() {
	// --stream: answer one input document after another (one output line
	// each) until stdin ends, so a test can ask many questions of one process.
	stream := len(os.Args) > 1 && os.Args[1] == "--stream"
	fail := func(err error) {
		fmt.Fprintf(os.Stderr, "policy-oracle: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
	// Strict decoding of our own envelope: a typo must not silently change a test.
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields()
	enc := json.NewEncoder(os.Stdout)
	for {
		var in input
		if err := dec.Decode(&in); err != nil {
			if stream && errors.Is(err, io.EOF) {
				return
			}
			fail(fmt.Errorf("malformed input: %w", err))
		}
		out, err := run(in)
		if err != nil {
			fail(err)
		}
		if err := enc.Encode(out); err != nil {
			fail(fmt.Errorf("writing output: %w", err))
		}
		if !stream {
			return
		}
	}
}

func newLogger() *slog.Logger {
	var level slog.Level
	switch strings.ToLower(os.Getenv("POLICY_ORACLE_LOG")) {
	case "debug":
		level = slog.LevelDebug
	case "info":
		level = slog.LevelInfo
	case "warn":
		level = slog.LevelWarn
	case "error":
		level = slog.LevelError
	default:
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

func run(in input) (*output, error) {
	log := newLogger()
	if in.ClusterName == "" {
		in.ClusterName = "default"
	}
	ipv4, ipv6 := in.IPv4 == nil || *in.IPv4, in.IPv6 == nil || *in.IPv6
	if !ipv4 && !ipv6 {
		return nil, errors.New("malformed input: ipv4 and ipv6 are both false")
	}

	// Agent configuration that the policy code reads from globals. Everything
	// else keeps upstream's defaults (option.Config's initial value:
	// EnableICMPRules, EnableNonDefaultDenyPolicies on, host firewall off,
	// allow-localhost not "always", ClusterID 0).
	option.Config.EnableIPv4 = ipv4
	option.Config.EnableIPv6 = ipv6
	option.Config.ClusterName = in.ClusterName
	option.Config.EnableNodeSelectorLabels = in.NodeSelectorLabels
	policy.SetPolicyEnabled(option.DefaultEnforcement)
	// Must precede policy parsing: the "cluster" entity selects this cluster's name.
	policyapi.InitEntities(in.ClusterName)

	out := &output{
		Verdicts:       []string{},
		Enforced:       []bool{},
		Errors:         []policyError{},
		Reserved:       []reservedIdentity{},
		IdentityLabels: map[string][]string{},
	}

	// ---- identities
	ids := map[identity.NumericIdentity]*identity.Identity{}
	given := map[identity.NumericIdentity]bool{}
	for i, ii := range in.Identities {
		nid := identity.NumericIdentity(ii.ID)
		if nid == identity.IdentityUnknown {
			return nil, fmt.Errorf("malformed input: identities[%d]: id 0 is not an identity", i)
		}
		if given[nid] {
			return nil, fmt.Errorf("malformed input: identities[%d]: duplicate id %d", i, ii.ID)
		}
		var lbls labels.Labels
		switch {
		case ii.CIDR != "" && len(ii.Labels) > 0:
			return nil, fmt.Errorf("malformed input: identities[%d]: give either labels or cidr", i)
		case ii.CIDR != "":
			// The ipcache allocates CIDR identities in the local scope only;
			// the datapath's aggregation (and so Lookup) depends on the scope.
			if !nid.HasLocalScope() {
				return nil, fmt.Errorf("malformed input: identities[%d]: cidr identity %d is not in the local scope (>= 2^24)", i, ii.ID)
			}
			pfx, err := netip.ParsePrefix(ii.CIDR)
			if err != nil {
				return nil, fmt.Errorf("malformed input: identities[%d]: %w", i, err)
			}
			if pfx != pfx.Masked() {
				return nil, fmt.Errorf("malformed input: identities[%d]: cidr %s has host bits set", i, ii.CIDR)
			}
			lbls = labels.GetCIDRLabels(pfx)
		case len(ii.Labels) > 0:
			lbls = labels.NewLabelsFromModel(ii.Labels)
		default:
			return nil, fmt.Errorf("malformed input: identities[%d]: no labels and no cidr", i)
		}
		given[nid] = true
		ids[nid] = identity.NewIdentity(nid, lbls)
		out.IdentityLabels[nid.StringID()] = ids[nid].LabelArray.GetModel()
	}
	// Upstream's reserved identities, unless the input redefined the ID.
	for nid := range identity.ListReservedIdentities() {
		if given[nid] {
			continue
		}
		ids[nid] = identity.LookupReservedIdentity(nid)
		out.Reserved = append(out.Reserved, reservedIdentity{ID: uint32(nid), Labels: ids[nid].LabelArray.GetModel()})
	}
	sort.Slice(out.Reserved, func(a, b int) bool { return out.Reserved[a].ID < out.Reserved[b].ID })
	idMap := identity.IdentityMap{}
	for nid, id := range ids {
		idMap[nid] = id.LabelArray
	}

	// ---- named ports
	ingressPorts := map[identity.NumericIdentity]ciliumtypes.NamedPortMap{}
	multi := ciliumtypes.NewNamedPortMultiMap()
	for key, list := range in.NamedPorts {
		n, err := strconv.ParseUint(key, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("malformed input: named_ports key %q is not an identity", key)
		}
		nid := identity.NumericIdentity(n)
		pm := ciliumtypes.NamedPortMap{}
		for _, np := range list {
			if err := pm.AddPort(np.Name, np.Port, np.Protocol); err != nil {
				return nil, fmt.Errorf("malformed input: named_ports[%s]: %w", key, err)
			}
		}
		ingressPorts[nid] = pm
		multi.Update(nid, nil, pm)
	}

	// ---- repository (same constructor arguments as upstream's own tests)
	idMgr := identitymanager.NewIDManager(log)
	repo := policy.NewPolicyRepository(log, idMap,
		&testcertificatemanager.Fake{},
		envoypolicy.NewEnvoyL7RulesTranslator(log, certificatemanager.NewMockSecretManagerInline()),
		idMgr, testpolicy.NewPolicyMetricsNoop())
	repo.UpdateIdentities(idMap, nil) // subject selector cache
	repo.SetNamedPortsGetter(namedPorts{multi})

	// ---- policies
	for i, raw := range in.Policies {
		entries, res, err := parsePolicy(log, in.ClusterName, i, raw)
		if err != nil {
			var perr *parseError
			if errors.As(err, &perr) {
				out.Errors = append(out.Errors, policyError{Policy: i, Error: perr.Error()})
				continue
			}
			return nil, fmt.Errorf("malformed input: policies[%d]: %w", i, err)
		}
		repo.ReplaceByResource(entries, res)
	}

	// ---- queries (resolve + distill once per subject)
	redirects := map[string]uint16{policy.FallbackRedirectID: 0xffff} // as upstream's LookupFlow
	distilled := map[identity.NumericIdentity]*policy.EndpointPolicy{}
	for qi, q := range in.Queries {
		subj := identity.NumericIdentity(q.Subject)
		peer := identity.NumericIdentity(q.Peer)
		sid, ok := ids[subj]
		if !ok {
			return nil, fmt.Errorf("malformed input: queries[%d]: subject %d is not a known identity", qi, q.Subject)
		}
		if _, ok := ids[peer]; !ok {
			return nil, fmt.Errorf("malformed input: queries[%d]: peer %d is not a known identity", qi, q.Peer)
		}
		if q.Proto < 1 || q.Proto > 255 {
			return nil, fmt.Errorf("malformed input: queries[%d]: proto %d out of range 1..255", qi, q.Proto)
		}
		proto := u8proto.U8proto(q.Proto)
		minPort := 0
		if proto == u8proto.TCP || proto == u8proto.UDP || proto == u8proto.SCTP {
			minPort = 1
		}
		if q.Port < minPort || q.Port > 65535 {
			return nil, fmt.Errorf("malformed input: queries[%d]: port %d out of range %d..65535", qi, q.Port, minPort)
		}

		epp, ok := distilled[subj]
		if !ok {
			sp, _, err := repo.ComputeSelectorPolicy(sid)
			if err != nil {
				return nil, fmt.Errorf("resolving policy for subject %d: %w", q.Subject, err)
			}
			epp = sp.DistillPolicy(log, &owner{id: subj, ports: ingressPorts[subj], log: log}, redirects)
			epp.Ready()
			distilled[subj] = epp
		}

		var key policytypes.Key
		var enforced bool
		switch q.Direction {
		case "ingress":
			key, enforced = policy.IngressKey(), epp.SelectorPolicy.IngressPolicyEnabled
		case "egress":
			key, enforced = policy.EgressKey(), epp.SelectorPolicy.EgressPolicyEnabled
		default:
			return nil, fmt.Errorf("malformed input: queries[%d]: direction %q is neither ingress nor egress", qi, q.Direction)
		}
		// Full 16-bit port prefix: an exact-port key as the datapath builds it
		// (also for ICMP type 0, where WithPortProto would make a wildcard).
		key = key.WithIdentity(peer).WithPortProtoPrefix(proto, uint16(q.Port), 16)
		entry, _, _ := epp.Lookup(key)
		verdict := "deny"
		if entry.IsAllow() {
			verdict = "allow"
		}
		out.Verdicts = append(out.Verdicts, verdict)
		out.Enforced = append(out.Enforced, enforced)
	}
	for _, epp := range distilled {
		epp.Detach(log)
	}
	return out, nil
}

// parseError is a policy that upstream rejects: reported in "errors", skipped.
type parseError struct{ err error }

func (e *parseError) Error() string { return e.err.Error() }

// parsePolicy turns one Kubernetes object into repository entries the way the
// agent's policy watcher does. A decode error of a known kind counts as a
// rejection (the API server would not have stored the object); an unknown
// kind is malformed input.
func parsePolicy(log *slog.Logger, clusterName string, idx int, raw json.RawMessage) (policytypes.PolicyEntries, ipcachetypes.ResourceID, error) {
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := json.Unmarshal(raw, &tm); err != nil {
		return nil, "", err
	}
	// Resource IDs carry the input index so that two objects with the same
	// name never replace each other.
	resID := func(kind ipcachetypes.ResourceKind, ns, name string) ipcachetypes.ResourceID {
		return ipcachetypes.NewResourceID(kind, ns, fmt.Sprintf("%s#%d", name, idx))
	}
	switch {
	case tm.APIVersion == "cilium.io/v2" && tm.Kind == "CiliumNetworkPolicy":
		var cnp ciliumv2.CiliumNetworkPolicy
		if err := decodeK8s(raw, &cnp); err != nil {
			return nil, "", &parseError{fmt.Errorf("decoding CiliumNetworkPolicy: %w", err)}
		}
		// Namespaced: the API server always stores one (kubectl's default).
		// Without it Parse would treat the object as a CCNP.
		if cnp.Namespace == "" {
			cnp.Namespace = "default"
		}
		rules, err := cnp.Parse(log, clusterName)
		if err != nil {
			return nil, "", &parseError{err}
		}
		return policyutils.RulesToPolicyEntries(rules), resID(ipcachetypes.ResourceKindCNP, cnp.Namespace, cnp.Name), nil
	case tm.APIVersion == "cilium.io/v2" && tm.Kind == "CiliumClusterwideNetworkPolicy":
		var ccnp ciliumv2.CiliumClusterwideNetworkPolicy
		if err := decodeK8s(raw, &ccnp); err != nil {
			return nil, "", &parseError{fmt.Errorf("decoding CiliumClusterwideNetworkPolicy: %w", err)}
		}
		ccnp.Namespace = "" // cluster-scoped: the API server drops a namespace
		rules, err := ccnp.Parse(log, clusterName)
		if err != nil {
			return nil, "", &parseError{err}
		}
		return policyutils.RulesToPolicyEntries(rules), resID(ipcachetypes.ResourceKindCCNP, "", ccnp.Name), nil
	case tm.APIVersion == "networking.k8s.io/v1" && tm.Kind == "NetworkPolicy":
		var np slimnetv1.NetworkPolicy
		if err := decodeK8s(raw, &np); err != nil {
			return nil, "", &parseError{fmt.Errorf("decoding NetworkPolicy: %w", err)}
		}
		entries, err := k8s.ParseNetworkPolicy(log, clusterName, &np)
		if err != nil {
			return nil, "", &parseError{err}
		}
		return entries, resID(ipcachetypes.ResourceKindNetpol, np.Namespace, np.Name), nil
	}
	return nil, "", fmt.Errorf("unsupported apiVersion %q kind %q", tm.APIVersion, tm.Kind)
}

// decodeK8s decodes like the Kubernetes JSON serializer: case-sensitive field
// names, unknown fields ignored (the API server prunes them for CRDs).
func decodeK8s(raw []byte, into any) error {
	return sigsjson.UnmarshalCaseSensitivePreserveInts(bytes.TrimSpace(raw), into)
}
