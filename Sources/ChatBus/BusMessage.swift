// The bus interface and relay wire format arrive with the rooms issue.
