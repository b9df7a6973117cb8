//go:build tools

// Test tools built from the pinned istio.io/istio module: pilot-discovery (istiod) and
// pilot-agent (istio-agent). Nothing here ships in the product.
package tools

import (
	_ "istio.io/istio/pilot/cmd/pilot-agent"
	_ "istio.io/istio/pilot/cmd/pilot-discovery"
)
