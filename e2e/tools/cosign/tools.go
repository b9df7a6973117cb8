//go:build tools

// The cosign CLI, built for the signature tests: it signs modules in the local registry, and
// verifies what the operator's CLI signs.
package tools

import _ "github.com/sigstore/cosign/v2/cmd/cosign"
