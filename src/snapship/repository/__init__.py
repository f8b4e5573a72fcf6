"""The repository: chunks, manifests and keys on top of a storage backend; owns write order.

`repo.Repository` is the repository with its key, `catalog.Catalog` the one without. Nothing
is imported here: a keyless command (prune, locks) must not load the key's code with the
package.
"""
