"""HTTP handlers, one RouteTableDef per resource."""
