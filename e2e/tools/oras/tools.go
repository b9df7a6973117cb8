//go:build tools

// Package tools pins the oras CLI module so `go build oras.land/oras/cmd/oras` uses go.sum.
package tools

import _ "oras.land/oras/cmd/oras"
