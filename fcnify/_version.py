"""fcnify's version: a leaf module, so that what records it (the files ``export`` writes) need not import the
package."""

__version__ = "0.1.0"
