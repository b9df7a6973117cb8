//go:build tools

// Pins CoreDNS, the test node's cluster DNS (Service and pod names under cluster.local).
package tools

import _ "github.com/coredns/coredns"
