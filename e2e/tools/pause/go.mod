// The sandbox ("pause") process of the test node's pods: holds a pod's namespaces, reaps
// orphans, exits on SIGTERM/SIGINT. Kubernetes' own is a C file; this is the same in Go so it
// builds static with the Go toolchain the other test tools use. Nothing here ships.
module wasmfilter.dev/e2e/tools/pause

go 1.25.0
