// gpreflect: a gRPC server reflection client, the way grpcurl-style tools
// ask (grpc.reflection.v1alpha, the client stubs of Debian's grpc-go), for
// the tests of rpcplugin's reflection (rpcplugin_runtime_enable_reflection).
//
//	gpreflect [--timeout D] [--automtls-cert-dir DIR] ADDRESS COMMAND [ARG] [COMMAND [ARG]...]
//
// ADDRESS is unix:/path, unix:///path, an absolute socket path, or
// host:port.  Every COMMAND is one request on one ServerReflectionInfo
// stream, in order:
//
//	list             list_services: each service name on a line
//	describe SYMBOL  file_containing_symbol; the descriptor is then built
//	                 with protodesc from every file received on the stream
//	                 (so imports sent earlier count) and printed:
//	                   FILE grpc_stdio.proto
//	                   SERVICE plugin.GRPCStdio
//	                     rpc StreamStdio(google.protobuf.Empty) returns (stream plugin.StdioData)
//	                 (MESSAGE with "  field TYPE NAME = N" lines, ENUM with
//	                 "  value NAME = N" lines, METHOD with its rpc line)
//	file NAME        file_by_filename: "FILE name" for each file of the
//	                 response, in the order sent
//	symbol SYMBOL    file_containing_symbol, printed as file
//	extensions TYPE  all_extension_numbers_of_type: "EXTENSIONS TYPE N..."
//
// An error_response prints "ERROR <code> <NAME>: <message>" (for example
// "ERROR 5 NOT_FOUND: unknown symbol: x") and the next command goes on; the
// exit status is then 1.  A failed call prints "RPC_ERROR <Code>: <desc>"
// (for example "RPC_ERROR Unimplemented: ...") and exits 1; a usage error
// exits 2.
//
// --automtls-cert-dir DIR: TLS as go-plugin's AutoMTLS client does it:
// DIR/client.pem and DIR/client-key.pem are the client's certificate and
// key, DIR/server.pem the plugin's certificate (the only root), server
// name "localhost".
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

func usage() {
	fmt.Fprintf(os.Stderr, "usage: gpreflect [--timeout D] [--automtls-cert-dir DIR] ADDRESS "+
		"(list | describe SYMBOL | file NAME | symbol SYMBOL | extensions TYPE)...\n")
	os.Exit(2)
}

func dial(ctx context.Context, address, certDir string) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{grpc.WithBlock()}
	if certDir != "" {
		cert, err := tls.LoadX509KeyPair(filepath.Join(certDir, "client.pem"),
			filepath.Join(certDir, "client-key.pem"))
		if err != nil {
			return nil, err
		}
		serverPEM, err := ioutil.ReadFile(filepath.Join(certDir, "server.pem"))
		if err != nil {
			return nil, err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(serverPEM) {
			return nil, errors.New("server.pem: no certificate")
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			Certificates: []tls.Certificate{cert},
			RootCAs:      roots,
			ServerName:   "localhost",
		})))
	} else {
		opts = append(opts, grpc.WithInsecure())
	}
	target := address
	path := ""
	switch {
	case strings.HasPrefix(address, "unix://"):
		path = strings.TrimPrefix(address, "unix://")
	case strings.HasPrefix(address, "unix:"):
		path = strings.TrimPrefix(address, "unix:")
	case strings.HasPrefix(address, "/"):
		path = address
	}
	if path != "" {
		// grpc-go 1.33 has no unix resolver: dial the socket ourselves.
		target = "passthrough:///localhost"
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	}
	return grpc.DialContext(ctx, target, opts...)
}

// session: one stream and every file it received.
type session struct {
	stream rpb.ServerReflection_ServerReflectionInfoClient
	files  map[string]*descriptorpb.FileDescriptorProto
	failed bool
}

func (s *session) ask(req *rpb.ServerReflectionRequest) (*rpb.ServerReflectionResponse, error) {
	if err := s.stream.Send(req); err != nil {
		// The status comes with Recv.
		if _, rerr := s.stream.Recv(); rerr != nil {
			return nil, rerr
		}
		return nil, err
	}
	return s.stream.Recv()
}

// keep stores the files of a response; returns their names in order, or
// false after printing an error_response.
func (s *session) keep(resp *rpb.ServerReflectionResponse) ([]string, bool) {
	if e := resp.GetErrorResponse(); e != nil {
		fmt.Printf("ERROR %d %s: %s\n", e.ErrorCode,
			strings.ToUpper(codeName(codes.Code(e.ErrorCode))), e.ErrorMessage)
		s.failed = true
		return nil, false
	}
	fdr := resp.GetFileDescriptorResponse()
	if fdr == nil {
		fmt.Printf("ERROR unexpected response %T\n", resp.MessageResponse)
		s.failed = true
		return nil, false
	}
	var names []string
	for _, b := range fdr.FileDescriptorProto {
		fd := &descriptorpb.FileDescriptorProto{}
		if err := proto.Unmarshal(b, fd); err != nil {
			fmt.Printf("ERROR bad FileDescriptorProto: %v\n", err)
			s.failed = true
			return nil, false
		}
		s.files[fd.GetName()] = fd
		names = append(names, fd.GetName())
	}
	return names, true
}

// codeName: "NOT_FOUND" for codes.NotFound (the proto enum's spelling).
func codeName(c codes.Code) string {
	names := map[codes.Code]string{
		codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
		codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
		codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
		codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
		codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
		codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
		codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
		codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
	}
	if n, ok := names[c]; ok {
		return n
	}
	return fmt.Sprintf("CODE_%d", int(c))
}

func streaming(stream bool, name protoreflect.FullName) string {
	if stream {
		return "stream " + string(name)
	}
	return string(name)
}

func rpcLine(m protoreflect.MethodDescriptor) string {
	return fmt.Sprintf("  rpc %s(%s) returns (%s)", m.Name(),
		streaming(m.IsStreamingClient(), m.Input().FullName()),
		streaming(m.IsStreamingServer(), m.Output().FullName()))
}

func fieldType(f protoreflect.FieldDescriptor) string {
	t := f.Kind().String()
	switch f.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		t = string(f.Message().FullName())
	case protoreflect.EnumKind:
		t = string(f.Enum().FullName())
	}
	if f.IsList() {
		t = "repeated " + t
	}
	return t
}

func (s *session) describe(symbol string) {
	resp, err := s.ask(&rpb.ServerReflectionRequest{
		MessageRequest: &rpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: symbol}})
	if err != nil {
		rpcError(err)
	}
	names, ok := s.keep(resp)
	if !ok {
		return
	}
	set := &descriptorpb.FileDescriptorSet{}
	for _, fd := range s.files {
		set.File = append(set.File, fd)
	}
	files, err := protodesc.NewFiles(set)
	if err != nil {
		fmt.Printf("ERROR descriptors do not resolve: %v\n", err)
		s.failed = true
		return
	}
	d, err := files.FindDescriptorByName(protoreflect.FullName(symbol))
	if err != nil {
		fmt.Printf("ERROR %s not in the files received (%s): %v\n", symbol,
			strings.Join(names, ", "), err)
		s.failed = true
		return
	}
	fmt.Printf("FILE %s\n", d.ParentFile().Path())
	switch d := d.(type) {
	case protoreflect.ServiceDescriptor:
		fmt.Printf("SERVICE %s\n", d.FullName())
		for i := 0; i < d.Methods().Len(); i++ {
			fmt.Println(rpcLine(d.Methods().Get(i)))
		}
	case protoreflect.MethodDescriptor:
		fmt.Printf("METHOD %s\n", d.FullName())
		fmt.Println(rpcLine(d))
	case protoreflect.MessageDescriptor:
		fmt.Printf("MESSAGE %s\n", d.FullName())
		for i := 0; i < d.Fields().Len(); i++ {
			f := d.Fields().Get(i)
			fmt.Printf("  field %s %s = %d\n", fieldType(f), f.Name(), f.Number())
		}
	case protoreflect.EnumDescriptor:
		fmt.Printf("ENUM %s\n", d.FullName())
		for i := 0; i < d.Values().Len(); i++ {
			v := d.Values().Get(i)
			fmt.Printf("  value %s = %d\n", v.Name(), v.Number())
		}
	default:
		fmt.Printf("SYMBOL %s\n", d.FullName())
	}
}

func rpcError(err error) {
	st, _ := status.FromError(err)
	fmt.Printf("RPC_ERROR %s: %s\n", st.Code(), st.Message())
	os.Exit(1)
}

func main() {
	timeout := flag.Duration("timeout", 10*time.Second, "bound on the whole session")
	certDir := flag.String("automtls-cert-dir", "", "client.pem, client-key.pem, server.pem")
	flag.Usage = usage
	flag.Parse()
	args := flag.Args()
	if len(args) < 2 {
		usage()
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := dial(ctx, args[0], *certDir)
	if err != nil {
		fmt.Printf("RPC_ERROR dial %s: %v\n", args[0], err)
		os.Exit(1)
	}
	defer conn.Close()
	stream, err := rpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		rpcError(err)
	}
	s := &session{stream: stream, files: map[string]*descriptorpb.FileDescriptorProto{}}
	for rest := args[1:]; len(rest) > 0; {
		cmd := rest[0]
		arg := ""
		if cmd != "list" {
			if len(rest) < 2 {
				usage()
			}
			arg = rest[1]
			rest = rest[2:]
		} else {
			rest = rest[1:]
		}
		switch cmd {
		case "list":
			resp, err := s.ask(&rpb.ServerReflectionRequest{
				MessageRequest: &rpb.ServerReflectionRequest_ListServices{ListServices: "*"}})
			if err != nil {
				rpcError(err)
			}
			l := resp.GetListServicesResponse()
			if l == nil {
				s.keep(resp) // prints the error
				continue
			}
			for _, svc := range l.Service {
				fmt.Println(svc.Name)
			}
		case "describe":
			s.describe(arg)
		case "file", "symbol":
			req := &rpb.ServerReflectionRequest{
				MessageRequest: &rpb.ServerReflectionRequest_FileByFilename{FileByFilename: arg}}
			if cmd == "symbol" {
				req = &rpb.ServerReflectionRequest{
					MessageRequest: &rpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: arg}}
			}
			resp, err := s.ask(req)
			if err != nil {
				rpcError(err)
			}
			if names, ok := s.keep(resp); ok {
				for _, n := range names {
					fmt.Printf("FILE %s\n", n)
				}
			}
		case "extensions":
			resp, err := s.ask(&rpb.ServerReflectionRequest{
				MessageRequest: &rpb.ServerReflectionRequest_AllExtensionNumbersOfType{AllExtensionNumbersOfType: arg}})
			if err != nil {
				rpcError(err)
			}
			e := resp.GetAllExtensionNumbersResponse()
			if e == nil {
				s.keep(resp)
				continue
			}
			line := "EXTENSIONS " + e.BaseTypeName
			for _, n := range e.ExtensionNumber {
				line += fmt.Sprintf(" %d", n)
			}
			fmt.Println(line)
		default:
			usage()
		}
	}
	if err := stream.CloseSend(); err != nil {
		rpcError(err)
	}
	if _, err := stream.Recv(); err == nil {
		fmt.Println("RPC_ERROR extra response after the last request")
		os.Exit(1)
	} else if err != io.EOF {
		rpcError(err)
	}
	if s.failed {
		os.Exit(1)
	}
}
