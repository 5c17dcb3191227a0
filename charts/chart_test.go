// Package charts checks the Helm chart and the kustomize manifests offline:
// it renders them with Helm's and kustomize's Go libraries, decodes every
// object strictly into the Kubernetes API types, and checks what matters
// against the real katcp-bridge binary. It is a separate module so that
// these heavy dependencies stay out of the library's import graph.
package charts

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	kubefake "helm.sh/helm/v3/pkg/kube/fake"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/storage"
	"helm.sh/helm/v3/pkg/storage/driver"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

const chartDir = "katcp-bridge"

var (
	bridgeBin string   // the katcp-bridge binary, built from the parent module
	envNames  []string // the variables its --help lists
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "katcp-charts-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bridgeBin = filepath.Join(dir, "katcp-bridge")
	build := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-o", bridgeBin, "./cmd/katcp-bridge")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building katcp-bridge: %v\n%s", err, out)
		os.Exit(1)
	}
	help, err := exec.Command(bridgeBin, "--help").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "katcp-bridge --help: %v\n%s", err, help)
		os.Exit(1)
	}
	envNames = regexp.MustCompile(`(?m)^\s+(KATCP_BRIDGE_[A-Z_]+)$`).FindAllString(string(help), -1)
	for i := range envNames {
		envNames[i] = strings.TrimSpace(envNames[i])
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// objects is a rendered set of manifests, decoded strictly.
type objects struct {
	deployments []appsv1.Deployment
	services    []corev1.Service
	accounts    []corev1.ServiceAccount
	configMaps  []corev1.ConfigMap
	pdbs        []policyv1.PodDisruptionBudget
	policies    []networkingv1.NetworkPolicy
	pods        []corev1.Pod
	monitors    []serviceMonitor
}

// serviceMonitor is the part of monitoring.coreos.com/v1 ServiceMonitor
// the chart uses (that API is not in k8s.io/api).
type serviceMonitor struct {
	APIVersion string             `json:"apiVersion"`
	Kind       string             `json:"kind"`
	Metadata   map[string]any     `json:"metadata"`
	Spec       serviceMonitorSpec `json:"spec"`
}

type serviceMonitorSpec struct {
	Selector struct {
		MatchLabels map[string]string `json:"matchLabels"`
	} `json:"selector"`
	Endpoints []struct {
		Port     string `json:"port"`
		Path     string `json:"path"`
		Interval string `json:"interval"`
	} `json:"endpoints"`
}

func decodeAll(t *testing.T, manifests string) objects {
	t.Helper()
	var o objects
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(manifests, -1) {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var head struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			t.Fatalf("bad YAML: %v\n%s", err, doc)
		}
		strict := func(v any) {
			if err := yaml.UnmarshalStrict([]byte(doc), v); err != nil {
				t.Fatalf("%s does not decode strictly: %v\n%s", head.Kind, err, doc)
			}
		}
		switch head.Kind {
		case "Deployment":
			var d appsv1.Deployment
			strict(&d)
			o.deployments = append(o.deployments, d)
		case "Service":
			var s corev1.Service
			strict(&s)
			o.services = append(o.services, s)
		case "ServiceAccount":
			var s corev1.ServiceAccount
			strict(&s)
			o.accounts = append(o.accounts, s)
		case "ConfigMap":
			var c corev1.ConfigMap
			strict(&c)
			o.configMaps = append(o.configMaps, c)
		case "PodDisruptionBudget":
			var p policyv1.PodDisruptionBudget
			strict(&p)
			o.pdbs = append(o.pdbs, p)
		case "NetworkPolicy":
			var n networkingv1.NetworkPolicy
			strict(&n)
			o.policies = append(o.policies, n)
		case "Pod":
			var p corev1.Pod
			strict(&p)
			o.pods = append(o.pods, p)
		case "ServiceMonitor":
			var s serviceMonitor
			strict(&s)
			o.monitors = append(o.monitors, s)
		default:
			t.Fatalf("unexpected kind %q", head.Kind)
		}
	}
	return o
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func subset(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// checkObjects asserts what a working deployment of the bridge needs.
func checkObjects(t *testing.T, o objects) {
	t.Helper()
	if len(o.deployments) != 1 {
		t.Fatalf("%d Deployments, want 1", len(o.deployments))
	}
	d := o.deployments[0]
	podLabels := d.Spec.Template.Labels
	if !subset(d.Spec.Selector.MatchLabels, podLabels) {
		t.Errorf("Deployment selector %v does not select its pods %v", d.Spec.Selector.MatchLabels, podLabels)
	}
	spec := d.Spec.Template.Spec
	if spec.EnableServiceLinks == nil || *spec.EnableServiceLinks {
		t.Error("enableServiceLinks must be false: service-link variables collide with KATCP_BRIDGE_*")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers", len(spec.Containers))
	}
	c := spec.Containers[0]
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
		if strings.HasPrefix(e.Name, "KATCP_BRIDGE_") && !slices.Contains(envNames, e.Name) {
			t.Errorf("env %s is not a variable katcp-bridge --help lists", e.Name)
		}
	}
	if env["KATCP_BRIDGE_NATS_URL"] == "" || env["KATCP_BRIDGE_DEVICES_FILE"] == "" {
		t.Errorf("env lacks the NATS URL or the devices file: %v", env)
	}
	// Two pods, or a rolling update, may only share devices through leases.
	several := d.Spec.Replicas == nil || *d.Spec.Replicas > 1 || d.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType
	if several && env["KATCP_BRIDGE_LEASES"] != "on" {
		t.Errorf("%v replicas with strategy %q but KATCP_BRIDGE_LEASES=%q: two pods could hold one device", d.Spec.Replicas, d.Spec.Strategy.Type, env["KATCP_BRIDGE_LEASES"])
	}
	// The HTTP port the probes use is the one the binary listens on.
	var httpPort int32
	for _, p := range c.Ports {
		if p.Name == "http" {
			httpPort = p.ContainerPort
		}
	}
	if want := fmt.Sprintf(":%d", httpPort); httpPort == 0 || env["KATCP_BRIDGE_HTTP_ADDR"] != want {
		t.Errorf("http port %d, KATCP_BRIDGE_HTTP_ADDR %q", httpPort, env["KATCP_BRIDGE_HTTP_ADDR"])
	}
	for name, probe := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Port.String() != "http" {
			t.Errorf("%s probe %+v", name, probe)
			continue
		}
		if !servedPaths[probe.HTTPGet.Path] {
			t.Errorf("%s probe path %s is not served by katcp-bridge", name, probe.HTTPGet.Path)
		}
	}
	if c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil && c.LivenessProbe.HTTPGet.Path != "/healthz" ||
		c.ReadinessProbe != nil && c.ReadinessProbe.HTTPGet != nil && c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Error("liveness must be /healthz and readiness /readyz")
	}
	// Restricted security.
	sc, psc := c.SecurityContext, spec.SecurityContext
	switch {
	case sc == nil || psc == nil:
		t.Fatal("missing security contexts")
	case psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot:
		t.Error("runAsNonRoot must be true")
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Error("readOnlyRootFilesystem must be true")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Error("allowPrivilegeEscalation must be false")
	case sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL"):
		t.Error("capabilities must drop ALL")
	case psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Error("seccomp must be RuntimeDefault")
	}
	shutdown, err := time.ParseDuration(env["KATCP_BRIDGE_SHUTDOWN_TIMEOUT"])
	if err != nil {
		t.Errorf("KATCP_BRIDGE_SHUTDOWN_TIMEOUT %q: %v", env["KATCP_BRIDGE_SHUTDOWN_TIMEOUT"], err)
	}
	if spec.TerminationGracePeriodSeconds == nil || time.Duration(*spec.TerminationGracePeriodSeconds)*time.Second <= shutdown {
		t.Errorf("terminationGracePeriodSeconds must exceed the bridge's drain (%v)", shutdown)
	}
	// The devices file is mounted from a ConfigMap.
	mounted := false
	for _, v := range spec.Volumes {
		if v.ConfigMap != nil {
			for _, m := range c.VolumeMounts {
				if m.Name == v.Name && strings.HasPrefix(env["KATCP_BRIDGE_DEVICES_FILE"], m.MountPath+"/") {
					mounted = true
				}
			}
		}
	}
	if !mounted {
		t.Error("the devices file is not mounted from a ConfigMap")
	}
	for _, s := range o.services {
		if !subset(s.Spec.Selector, podLabels) {
			t.Errorf("Service %s selects %v, not the pods %v", s.Name, s.Spec.Selector, podLabels)
		}
		for _, p := range s.Spec.Ports {
			if p.TargetPort.String() != "http" {
				t.Errorf("Service port targets %s", p.TargetPort.String())
			}
		}
	}
	for _, p := range o.pdbs {
		if !subset(p.Spec.Selector.MatchLabels, podLabels) {
			t.Errorf("PDB selects %v, not the pods", p.Spec.Selector.MatchLabels)
		}
	}
	for _, n := range o.policies {
		if !subset(n.Spec.PodSelector.MatchLabels, podLabels) {
			t.Errorf("NetworkPolicy selects %v, not the pods", n.Spec.PodSelector.MatchLabels)
		}
	}
	for _, m := range o.monitors {
		if !subset(m.Spec.Selector.MatchLabels, o.services[0].Labels) || m.Spec.Endpoints[0].Port != "http" || m.Spec.Endpoints[0].Path != "/metrics" {
			t.Errorf("ServiceMonitor %+v does not scrape the Service's /metrics", m.Spec)
		}
	}
}

// servedPaths are the HTTP paths the real binary answers, found by running
// it (embedded NATS on a free port, HTTP on 127.0.0.1:0).
var servedPaths = map[string]bool{}

func TestProbePathsAreServed(t *testing.T) {
	cmd := exec.Command(bridgeBin)
	cmd.Env = append(os.Environ(), "KATCP_BRIDGE_HTTP_ADDR=127.0.0.1:0", "KATCP_BRIDGE_EMBEDDED_NATS_PORT=0", "KATCP_BRIDGE_DEMO=true",
		"KATCP_BRIDGE_EMBEDDED_STORE_DIR="+t.TempDir())
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	addr := ""
	sc := bufio.NewScanner(stderr)
	for addr == "" && sc.Scan() {
		if line := sc.Text(); strings.Contains(line, "serving /metrics") {
			_, a, _ := strings.Cut(line, "address=")
			addr = strings.Fields(a)[0]
		}
	}
	go io.Copy(io.Discard, stderr)
	if addr == "" {
		t.Fatal("katcp-bridge did not report its HTTP address")
	}
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			resp, err := http.Get("http://" + addr + path)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					servedPaths[path] = true
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET %s: %v", path, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	return ch
}

// render renders the chart as `helm template` would, with values, and
// returns the manifests plus the test hook's.
func render(t *testing.T, vals map[string]any, apiVersions ...string) (string, error) {
	t.Helper()
	cfg := &action.Configuration{
		Releases:     storage.Init(driver.NewMemory()),
		KubeClient:   &kubefake.PrintingKubeClient{Out: io.Discard},
		Capabilities: chartutil.DefaultCapabilities,
		Log:          func(string, ...any) {},
	}
	install := action.NewInstall(cfg)
	install.DryRun = true
	install.ClientOnly = true
	install.ReleaseName = "bridge"
	install.Namespace = "telescope"
	install.APIVersions = apiVersions
	install.KubeVersion = &chartutil.KubeVersion{Version: "v1.31.0", Major: "1", Minor: "31"}
	rel, err := install.Run(loadChart(t), vals)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString(rel.Manifest)
	for _, h := range rel.Hooks {
		b.WriteString("\n---\n" + h.Manifest)
	}
	return b.String(), nil
}

func valuesFile(t *testing.T, name string) map[string]any {
	t.Helper()
	if name == "" {
		return map[string]any{}
	}
	v, err := chartutil.ReadValuesFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return v.AsMap()
}

func valuesFiles(t *testing.T) []string {
	files, err := filepath.Glob(filepath.Join(chartDir, "ci", "*.yaml"))
	if err != nil || len(files) < 3 {
		t.Fatalf("ci values files: %v %v", files, err)
	}
	return append([]string{""}, files...)
}

func TestLintStrict(t *testing.T) {
	for _, f := range valuesFiles(t) {
		lint := action.NewLint()
		lint.Strict = true
		lint.Namespace = "telescope"
		res := lint.Run([]string{chartDir}, valuesFile(t, f))
		for _, m := range res.Messages {
			if m.Severity > support.InfoSev { // warnings and errors; strict mode counts warnings
				t.Errorf("lint %s: %s", f, m)
			}
		}
		for _, err := range res.Errors {
			t.Errorf("lint %s: %v", f, err)
		}
	}
}

func TestRender(t *testing.T) {
	TestProbePathsAreServed(t)
	for _, f := range valuesFiles(t) {
		t.Run(filepath.Base(f+"default"), func(t *testing.T) {
			manifests, err := render(t, valuesFile(t, f), "monitoring.coreos.com/v1/ServiceMonitor")
			if err != nil {
				t.Fatal(err)
			}
			o := decodeAll(t, manifests)
			checkObjects(t, o)
			d := o.deployments[0]
			if d.Spec.Template.Annotations["checksum/devices"] == "" {
				t.Error("no checksum annotation: a devices change would not roll the pods")
			}
			if len(o.pods) != 1 || !strings.HasSuffix(o.pods[0].Spec.Containers[0].Command[0], "katcpcmd") {
				t.Errorf("helm test pod %+v", o.pods)
			}
		})
	}
}

func TestRenderDetails(t *testing.T) {
	TestProbePathsAreServed(t)
	// Defaults: a devices ConfigMap from values, PDB, no monitor or policy.
	manifests, err := render(t, valuesFile(t, filepath.Join(chartDir, "ci", "devices-values.yaml")))
	if err != nil {
		t.Fatal(err)
	}
	o := decodeAll(t, manifests)
	if len(o.configMaps) != 1 || !strings.Contains(o.configMaps[0].Data["devices.yaml"], "name: m001") {
		t.Errorf("devices ConfigMap %+v", o.configMaps)
	}
	if len(o.monitors) != 0 || len(o.policies) != 0 || len(o.pdbs) != 1 {
		t.Errorf("defaults: %d monitors, %d policies, %d PDBs", len(o.monitors), len(o.policies), len(o.pdbs))
	}
	if got := o.pods[0].Spec.Containers[0].Args; !slices.Contains(got, "nats://nats:4222/m000") {
		t.Errorf("helm test args %v", got)
	}
	// Full: existing ConfigMap and Secrets, OTel, monitor only where the API exists.
	full := valuesFile(t, filepath.Join(chartDir, "ci", "full-values.yaml"))
	without, err := render(t, full)
	if err != nil {
		t.Fatal(err)
	}
	if o := decodeAll(t, without); len(o.monitors) != 0 {
		t.Error("ServiceMonitor rendered without the monitoring API")
	}
	with, err := render(t, full, "monitoring.coreos.com/v1/ServiceMonitor")
	if err != nil {
		t.Fatal(err)
	}
	o = decodeAll(t, with)
	if len(o.monitors) != 1 || len(o.configMaps) != 0 || len(o.policies) != 1 {
		t.Errorf("full: %d monitors, %d ConfigMaps, %d policies", len(o.monitors), len(o.configMaps), len(o.policies))
	}
	env := map[string]string{}
	for _, e := range o.deployments[0].Spec.Template.Spec.Containers[0].Env {
		env[e.Name] = e.Value
	}
	for k, v := range map[string]string{
		"KATCP_BRIDGE_NATS_CREDS":     "/etc/nats/creds/nats.creds",
		"KATCP_BRIDGE_NATS_TLS_CA":    "/etc/nats/tls/ca.crt",
		"KATCP_BRIDGE_PREFIX":         "site.katcp",
		"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
		"OTEL_TRACES_SAMPLER_ARG":     "0.1",
		"GOMEMLIMIT":                  "400MiB",
	} {
		if env[k] != v {
			t.Errorf("env %s = %q, want %q", k, env[k], v)
		}
	}
	if _, ok := env["OTEL_TRACES_EXPORTER"]; !ok {
		t.Error("OTel enabled but no exporter set")
	}
	// The checksum follows the devices.
	a, _ := render(t, map[string]any{"devices": []any{map[string]any{"name": "a", "address": "h:1"}}})
	b, _ := render(t, map[string]any{"devices": []any{map[string]any{"name": "a", "address": "h:2"}}})
	if decodeAll(t, a).deployments[0].Spec.Template.Annotations["checksum/devices"] == decodeAll(t, b).deployments[0].Spec.Template.Annotations["checksum/devices"] {
		t.Error("the checksum does not change with the devices")
	}
}

func TestSchemaRejectsBadValues(t *testing.T) {
	for name, vals := range map[string]map[string]any{
		"wrong type":           {"replicaCount": "three"},
		"replicas sans leases": {"replicaCount": 2, "leases": map[string]any{"mode": "auto"}},
		"bad lease mode":       {"leases": map[string]any{"mode": "maybe"}},
		"bad lease TTL":        {"leases": map[string]any{"ttl": "5"}},
		"unknown key":          {"replicas": 3},
		"unknown nested key":   {"nats": map[string]any{"url": "nats://n:4222", "password": "x"}},
		"bad device name":      {"devices": []any{map[string]any{"name": "m.0", "address": "h:1"}}},
		"device without port":  {"devices": []any{map[string]any{"name": "m0", "address": "h"}}},
		"bad log level":        {"bridge": map[string]any{"logLevel": "loud"}},
		"bad duration":         {"bridge": map[string]any{"defaultTimeout": "5 seconds"}},
		"not a NATS URL":       {"nats": map[string]any{"url": "http://nats:4222"}},
	} {
		if _, err := render(t, vals); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !strings.Contains(err.Error(), "schema") {
			t.Errorf("%s: %v (want a schema error)", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(chartDir, "values.schema.json")); err != nil {
		t.Fatal(err)
	}
	schema, _ := os.ReadFile(filepath.Join(chartDir, "values.schema.json"))
	if bytes.Contains(schema, []byte(`"$ref": "http`)) {
		t.Error("the schema must be self-contained")
	}
}

func TestKustomize(t *testing.T) {
	TestProbePathsAreServed(t)
	for _, dir := range []string{"../deploy/base", "../deploy/overlays/example"} {
		t.Run(dir, func(t *testing.T) {
			k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
			m, err := k.Run(filesys.MakeFsOnDisk(), dir)
			if err != nil {
				t.Fatal(err)
			}
			out, err := m.AsYaml()
			if err != nil {
				t.Fatal(err)
			}
			o := decodeAll(t, string(out))
			checkObjects(t, o)
			if len(o.accounts) != 1 || len(o.pdbs) != 1 || len(o.policies) != 1 || len(o.services) != 1 || len(o.configMaps) != 1 {
				t.Errorf("objects: %d accounts, %d PDBs, %d policies, %d services, %d ConfigMaps",
					len(o.accounts), len(o.pdbs), len(o.policies), len(o.services), len(o.configMaps))
			}
			// The generated ConfigMap's hashed name is the one mounted.
			var vol corev1.Volume
			for _, v := range o.deployments[0].Spec.Template.Spec.Volumes {
				if v.Name == "devices" {
					vol = v
				}
			}
			if vol.ConfigMap == nil || vol.ConfigMap.Name != o.configMaps[0].Name || !strings.HasPrefix(vol.ConfigMap.Name, "katcp-bridge-devices-") {
				t.Errorf("devices volume %+v, ConfigMap %s", vol, o.configMaps[0].Name)
			}
		})
	}
}
