//go:build tools

// Package tools pins the helm CLI module so `go build helm.sh/helm/v3/cmd/helm` uses go.sum.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
